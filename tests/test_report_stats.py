"""Sweep report statistics on hand-made run folders: seeds aggregated, paired differences with t-intervals."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from flgc_lightning.report import make_report
from flgc_lightning.report.stats import Summary


def write_run(root: Path, job: int, arm: str, seed: int, test_acc: float, status: str = "finished",
              conv_type: str = "FLGC", groups: int = 8, extra: tuple = (), val_size=500, drop: tuple = ()) -> None:
    run = root / str(job)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in (f"arm={arm}", f"seed={seed}", "data.root=/x", *extra)))
    summary = {
        "status": status, "config": {"conv_type": conv_type, "groups": groups, "seed": seed, "val_size": val_size},
        "params": 1000, "macs": 2_000_000, "macs_nominal": 1_000_000, "macs_deployed": 1_100_000,
        "best_val_acc": test_acc + 0.01, "last_val_acc": test_acc, "test_acc": test_acc, "epochs_done": 3,
        "max_epochs": 3, "wall_time_s": 10.0, "channels_ever_moved": 4, "group_size_imbalance": 1.5,
    }
    (run / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k not in drop}))


def test_summary_is_mean_sample_std_and_t_interval():
    s = Summary.of([0.50, 0.52, 0.57])
    assert s.n == 3 and s.mean == pytest.approx(0.53)
    assert s.std == pytest.approx(math.sqrt(((0.03) ** 2 + (0.01) ** 2 + (0.04) ** 2) / 2))
    half = 4.302652729911275 * s.std / math.sqrt(3)  # t(0.975, df=2)
    assert (s.low, s.high) == (pytest.approx(0.53 - half), pytest.approx(0.53 + half))
    assert Summary.of([0.4]).std is None and Summary.of([]).n == 0


def test_report_groups_seeds_and_pairs_comparisons_by_seed(tmp_path):
    acc = {  # arm -> accuracy per seed
        ("FLGC-8", "FLGC"): [0.60, 0.62, 0.64],
        ("grouped-8", "grouped"): [0.55, 0.58, 0.58],
        ("FLGC-frozen-8", "FLGC-frozen"): [0.61, 0.60, 0.66],
    }
    job = 0
    for (arm, kind), values in acc.items():
        for seed, value in enumerate(values):
            write_run(tmp_path, job, arm, seed, value, conv_type=kind)
            job += 1
    write_run(tmp_path, job, "FLGC-8", 3, 0.99, status="running")  # unfinished: listed, not aggregated
    rows, text = make_report(tmp_path)
    assert len(rows) == 10
    with open(tmp_path / "report_summary.csv") as fh:
        table = list(csv.DictReader(fh))
    flgc = next(r for r in table if r["kind"] == "configuration" and r["conv_type"] == "FLGC")
    assert flgc["n"] == "3" and float(flgc["mean"]) == pytest.approx(0.62)
    assert float(flgc["std"]) == pytest.approx(0.02)
    diffs = {r["conv_type"]: r for r in table if r["kind"] == "difference"}
    # FLGC - grouped, seed by seed: +0.05, +0.04, +0.06 -> mean 0.05, sd 0.01, interval excludes 0
    vs_grouped = diffs["FLGC-grouped"]
    assert float(vs_grouped["mean"]) == pytest.approx(0.05) and float(vs_grouped["std"]) == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert float(vs_grouped["ci_low"]) == pytest.approx(0.05 - half) and float(vs_grouped["ci_high"]) == pytest.approx(0.05 + half)
    # FLGC - frozen: -0.01, +0.02, -0.02 -> interval contains 0
    vs_frozen = diffs["FLGC-FLGC-frozen"]
    assert float(vs_frozen["mean"]) == pytest.approx(-0.01 / 3)
    assert float(vs_frozen["ci_low"]) < 0 < float(vs_frozen["ci_high"])
    assert "treatment better (interval above 0)" in text and "no difference shown (interval contains 0)" in text
    assert "62.00 ± 2.00" in text and "3/4" in text  # 3 finished of 4 runs
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_comparisons_only_pair_equal_settings_and_seeds(tmp_path):
    write_run(tmp_path, 0, "FLGC-8", 0, 0.6, conv_type="FLGC")
    write_run(tmp_path, 1, "FLGC-8", 1, 0.7, conv_type="FLGC")
    write_run(tmp_path, 2, "grouped-8", 1, 0.5, conv_type="grouped")
    write_run(tmp_path, 3, "grouped-8", 2, 0.4, conv_type="grouped")
    write_run(tmp_path, 4, "grouped-8", 0, 0.1, conv_type="grouped", extra=("optimizer.lr=0.5",))  # other setting
    _, text = make_report(tmp_path)
    with open(tmp_path / "report_summary.csv") as fh:
        diffs = [r for r in csv.DictReader(fh) if r["kind"] == "difference"]
    # two grouped configurations (lr differs); FLGC pairs only with the one sharing its other settings, on seed 1
    assert len(diffs) == 1 and diffs[0]["n"] == "1" and float(diffs[0]["mean"]) == pytest.approx(0.2)
    assert "too few paired seeds" in text


def test_comparisons_pooled_over_g_use_every_pair_once(tmp_path):
    acc = {  # (arm, conv type, G) -> accuracy per seed
        ("FLGC-4", "FLGC", 4): [0.60, 0.62, 0.64], ("grouped-4", "grouped", 4): [0.58, 0.61, 0.60],
        ("FLGC-8", "FLGC", 8): [0.50, 0.55, 0.53], ("grouped-8", "grouped", 8): [0.51, 0.52, 0.52],
    }
    job = 0
    for (arm, kind, groups), values in acc.items():
        for seed, value in enumerate(values):
            write_run(tmp_path, job, arm, seed, value, conv_type=kind, groups=groups)
            job += 1
    _, text = make_report(tmp_path)
    with open(tmp_path / "report_summary.csv") as fh:
        pooled = [r for r in csv.DictReader(fh) if r["kind"] == "pooled difference"]
    assert len(pooled) == 1 and pooled[0]["groups"] == "all" and pooled[0]["n"] == "6"
    differences = [0.02, 0.01, 0.04, -0.01, 0.03, 0.01]  # G=4 seeds 0..2, then G=8
    mean = sum(differences) / 6
    std = math.sqrt(sum((d - mean) ** 2 for d in differences) / 5)
    half = 2.570581835636314 * std / math.sqrt(6)  # t(0.975, df=5)
    assert float(pooled[0]["mean"]) == pytest.approx(mean) and float(pooled[0]["std"]) == pytest.approx(std)
    assert float(pooled[0]["ci_low"]) == pytest.approx(mean - half)
    assert "| all | FLGC − grouped | 6 pairs (G = 4, 8 × seeds) |" in text


@pytest.mark.parametrize("val_size, label", [
    (500, "test accuracy of the checkpoint selected on validation (held-out training images)"),
    (None, "test accuracy of the checkpoint selected on the test split (validation = test, the reference setting: "
           "optimistic)"),
])
def test_report_says_which_split_selected_the_checkpoint(tmp_path, val_size, label):
    for seed in range(2):
        write_run(tmp_path, seed, "FLGC-8", seed, 0.6, val_size=val_size)
    _, text = make_report(tmp_path)
    assert f"Accuracy: {label};" in text


def test_unfinished_controls_have_no_deployed_macs_and_runs_show_moves_and_imbalance(tmp_path):
    """An unfinished FLGC-frozen/-balanced run has no end-of-training groups: its as-run (dense) MACs must not
    stand in for deployed MACs, as they may for dense and standard grouped runs."""
    for job, kind in enumerate(("FLGC-frozen", "FLGC-balanced", "grouped")):
        write_run(tmp_path, job, f"{kind}-8", 0, 0.5, status="running", conv_type=kind, drop=("macs_deployed",))
    rows, text = make_report(tmp_path)
    deployed = {r.conv_type: r.macs_deployed for r in rows}
    assert deployed == {"FLGC-frozen": None, "FLGC-balanced": None, "grouped": 2_000_000}
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert "channels ever moved" in header and "group-size imbalance" in header
    assert "| 4 | 1.50 |" in text


def test_estimator_arms_get_their_own_conv_type_and_loss_comparisons(tmp_path):
    """Summaries that record the estimator (or only overrides that set it) give FLGC-ste+dw and friends,
    compared with the frozen control, the reference estimator and grouped; lower cross-entropy is better."""
    values = {"ste": ([0.60, 0.62, 0.64], [1.0, 1.1, 1.2]), "ref": ([0.58, 0.60, 0.61], [1.2, 1.3, 1.4]),
              "frozen": ([0.55, 0.57, 0.59], [1.5, 1.6, 1.7])}
    job = 0
    for arm, (accs, losses) in values.items():
        for seed, (acc, loss) in enumerate(zip(accs, losses)):
            run = tmp_path / str(job)
            (run / ".hydra").mkdir(parents=True)
            extra = {"ste": ["model.assign_grad=ste", "model.dense_weight_grad=true"], "ref": [],
                     "frozen": ["model.assignment=frozen"]}[arm]
            (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in (f"seed={seed}", *extra)))
            config = {"groups": 8, "use_flgc": True, "assignment": "frozen" if arm == "frozen" else "learned",
                      "seed": seed, "val_size": 500}
            if arm == "ste" and seed == 0:  # newer summaries record the estimator themselves
                config.update(assign_grad="ste", dense_weight_grad=True)
            summary = {"status": "finished", "config": config, "test_acc": acc, "best_val_acc": acc, "best_epoch": 2,
                       "channels_ever_moved": 3,
                       "history": [{"epoch": 2, "val_loss": loss}], "epochs_done": 3, "max_epochs": 3,
                       "assignment_diagnostics": {"moves_inputs": 4, "moves_filters": 0,
                                                  "runner_up_share_inputs": 0.5, "runner_up_share_filters": None,
                                                  "channels_ever_moved_inputs": 3, "channels_ever_moved_filters": 0}}
            (run / "summary.json").write_text(json.dumps(summary))
            job += 1
    rows, text = make_report(tmp_path)
    assert {r.conv_type for r in rows} == {"FLGC-ste+dw", "FLGC", "FLGC-frozen"}
    with open(tmp_path / "report_summary.csv") as fh:
        diffs = [r for r in csv.DictReader(fh) if r["kind"] == "difference"]
    by_name = {}
    for r in diffs:
        by_name.setdefault(r["conv_type"], []).append(float(r["mean"]))
    assert by_name["FLGC-ste+dw-FLGC-frozen"] == [pytest.approx(0.05), pytest.approx(-0.5)]  # accuracy, loss
    assert by_name["FLGC-ste+dw-FLGC"][0] == pytest.approx((0.02 + 0.02 + 0.03) / 3)
    assert "| 8 | FLGC-ste+dw − FLGC-frozen | 0, 1, 2 | -0.500 | [-0.500, -0.500] | treatment better (interval below 0) |" in text
    assert "50 %" in text and "3.0 (3.0 / 0.0)" in text  # moves to the init runner-up; inputs / filters moved


def test_retrained_groups_are_compared_with_standard_groups_and_with_the_run_that_learned_them(tmp_path):
    """Study v2's question: does the learning arm lose to its own groups trained from scratch (the training path
    costs), and do those groups lose to standard grouped conv (the groups cost)?"""
    accs = {"FLGC-ste+dw+rg": [0.30, 0.31, 0.28], "FLGC-retrain": [0.33, 0.35, 0.33], "grouped": [0.34, 0.36, 0.33]}
    job = 0
    for kind, values in accs.items():
        for seed, acc in enumerate(values):
            write_run(tmp_path, job, f"{kind}-8", seed, acc, conv_type=kind)
            job += 1
    make_report(tmp_path)
    with open(tmp_path / "report_summary.csv") as fh:
        diffs = {r["conv_type"]: float(r["mean"]) for r in csv.DictReader(fh) if r["kind"] == "difference"}
    assert diffs["FLGC-ste+dw+rg-FLGC-retrain"] == pytest.approx(-0.04)
    assert diffs["FLGC-retrain-grouped"] == pytest.approx((-0.01 - 0.01 + 0.0) / 3)
    assert diffs["FLGC-ste+dw+rg-grouped"] == pytest.approx((-0.04 - 0.05 - 0.05) / 3)
