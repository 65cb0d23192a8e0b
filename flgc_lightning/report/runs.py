"""The runs of a sweep, one :class:`RunRow` each, read from their folders.

Every run directory below a sweep folder is read: its ``summary.json`` (written by
:class:`flgc_lightning.callbacks.RunSummary`), its ``.hydra/overrides.yaml`` (what the sweep set
for it, which says which runs differ only in their seed), or only ``.hydra/config.yaml`` for a run
that died before training started. Failed and unfinished runs are kept with their status; they are
never dropped silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from flgc_lightning.callbacks.run_summary import conv_type
from flgc_lightning.cli import ERROR_FILE
from flgc_lightning.errors import UserError

CONV_TYPES = ("dense", "grouped", "FLGC", "FLGC-frozen", "FLGC-balanced")  # the order of tables; others follow
# Overrides that say what a run is apart from its conv type; the seed is the replicate axis.
SEED_KEYS = ("seed",)
ARM_KEYS = ("arm", "study_arm", "groups", "model.groups", "model.use_flgc", "model.assignment", "model.assign_grad",
            "model.dense_weight_grad", "model.groups_from", "model.groups_shuffle", "assign_optim.lr_mult",
            "assign_optim.weight_decay", "assign_optim.warmup_epochs", "assign_optim.freeze_epoch",
            "assign_optim.tau_start", "assign_optim.tau_end", "assign_optim.tau_epochs",
            "assign_optim.regroup_epochs")
CONV_TYPE_KEYS = ("model.assign_grad", "model.dense_weight_grad", "model.groups_from", "model.groups_shuffle")
IGNORED_KEYS = ("ckpt_path", "hydra.")
STATUS_SHOWN = {"running": "unfinished", "finished": "finished", "failed": "failed", "interrupted": "interrupted"}


@dataclass
class RunRow:
    run: str
    conv_type: str
    groups: Optional[int]
    params: Optional[int]
    macs_nominal: Optional[int]  # uniform-group cost (= actual cost for dense and grouped)
    macs_deployed: Optional[int]  # learned-group cost at the end of training (FLGC), else actual
    best_acc: Optional[float]  # best validation accuracy, 0-1 (the test split in the reference setting)
    last_acc: Optional[float]
    epochs: Optional[int]
    max_epochs: Optional[int]
    wall_time_s: Optional[float]
    status: str
    error: str = ""
    seed: Optional[int] = None
    test_acc: Optional[float] = None  # test accuracy of the checkpoint selected on validation (test_after_fit)
    validation: str = "test split"  # or "N held-out training images"
    channels_ever_moved: Optional[int] = None
    group_size_imbalance: Optional[float] = None
    val_loss: Optional[float] = None  # validation cross-entropy at the selected (best) epoch
    moved_inputs: Optional[int] = None  # channels ever moved, inputs and filters apart
    moved_filters: Optional[int] = None
    runner_up_share: Optional[float] = None  # share of all moves that went to the channel's init runner-up
    config_key: str = ""  # the run's overrides without its seed: runs with equal keys are replicates
    shared_key: str = ""  # the same without the conv type and G: what paired comparisons must share

    @property
    def selected_acc(self) -> Optional[float]:
        """The accuracy to compare: test accuracy of the validation-selected checkpoint where there is one;
        otherwise the best validation accuracy, which in the reference setting is the (optimistic) best test accuracy."""
        return self.test_acc if self.test_acc is not None else self.best_acc


def run_overrides(run_dir: Path) -> Optional[list[str]]:
    """The command-line overrides of a run (``.hydra/overrides.yaml``), if Hydra saved them."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        return [str(o) for o in OmegaConf.load(path)]
    except Exception:  # unreadable: fall back to the summary's config
        return None


def _keys(overrides: list[str], drop: tuple[str, ...]) -> str:
    kept = [o for o in overrides if not o.lstrip("+~").split("=", 1)[0].startswith(IGNORED_KEYS)
            and o.lstrip("+~").split("=", 1)[0] not in drop]
    return " ".join(sorted(kept))


def find_run_dirs(root: Path) -> list[Path]:
    """Directories with a ``summary.json`` or a Hydra ``.hydra/config.yaml`` (resume copies excluded)."""
    runs = {p.parent for p in root.rglob("summary.json")}
    runs |= {p.parent.parent for p in root.rglob("config.yaml") if p.parent.name == ".hydra"}

    def key(path: Path):
        rel = path.relative_to(root).parts
        return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in rel)

    return sorted(runs, key=key)


def _kind(config: dict, overrides: dict) -> str:
    """The conv type from a summary's config, estimator and retraining settings included; summaries written
    before those were recorded take them from the run's overrides."""
    def get(key: str, default=None):
        value = config.get(key.split(".")[-1])
        return overrides.get(key, default) if value is None else value
    truthy = lambda v: str(v).lower() == "true" if isinstance(v, str) else bool(v)  # noqa: E731
    return conv_type(int(config.get("groups", 1)), truthy(config.get("use_flgc")), config.get("assignment", "learned"),
                     get("model.assign_grad", "reference"), truthy(get("model.dense_weight_grad", False)),
                     None if get("model.groups_from") in (None, "null") else get("model.groups_from"),
                     truthy(get("model.groups_shuffle", False)),
                     bool((config.get("assign_optim") or {}).get("regroup_epochs")))


def _from_summary(name: str, summary: dict, overrides: Optional[list[str]] = None) -> RunRow:
    config = summary.get("config") or {}
    given = dict(o.lstrip("+").split("=", 1) for o in overrides or [] if "=" in o)
    kind = (_kind(config, given) if "use_flgc" in config else None) or config.get("conv_type") or "unknown"
    diagnostics = summary.get("assignment_diagnostics") or {}
    moves = [diagnostics.get(k) for k in ("moves_inputs", "moves_filters")]
    shares = [diagnostics.get(k) for k in ("runner_up_share_inputs", "runner_up_share_filters")]
    to_runner_up = sum(m * s for m, s in zip(moves, shares) if m and s is not None)
    history = {h.get("epoch"): h for h in summary.get("history", [])}
    macs = summary.get("macs")
    deployed = summary.get("macs_deployed")
    if deployed is None and not kind.startswith("FLGC"):
        deployed = macs  # dense / standard grouped convs run exactly as counted (FLGC's as-run MACs are dense)
    status = summary.get("status", "running")
    return RunRow(
        run=name,
        conv_type=kind,
        groups=config.get("groups"),
        params=summary.get("params"),
        macs_nominal=summary.get("macs_nominal", macs),
        macs_deployed=deployed,
        best_acc=summary.get("best_val_acc"),
        last_acc=summary.get("last_val_acc"),
        epochs=summary.get("epochs_done"),
        max_epochs=summary.get("max_epochs"),
        wall_time_s=summary.get("wall_time_s"),
        status=STATUS_SHOWN.get(status, status),
        error=summary.get("error") or "",
        seed=config.get("seed"),
        test_acc=summary.get("test_acc"),
        validation="test split" if not config.get("val_size") else f"{config['val_size']} held-out training images",
        channels_ever_moved=summary.get("channels_ever_moved"),
        group_size_imbalance=summary.get("group_size_imbalance"),
        val_loss=history.get(summary.get("best_epoch"), {}).get("val_loss"),
        moved_inputs=diagnostics.get("channels_ever_moved_inputs"),
        moved_filters=diagnostics.get("channels_ever_moved_filters"),
        runner_up_share=(to_runner_up / sum(m for m in moves if m)) if any(moves) else None,
    )


def _from_hydra_config(name: str, path: Path) -> RunRow:
    """A run that never reached fit start: only its config tells what it was."""
    from omegaconf import OmegaConf

    groups, use_flgc, max_epochs = None, None, None
    try:
        cfg = OmegaConf.load(path)
        groups = OmegaConf.select(cfg, "model.groups", throw_on_resolution_failure=False)
        groups = groups if groups is not None else OmegaConf.select(cfg, "groups")
        use_flgc = OmegaConf.select(cfg, "model.use_flgc", throw_on_resolution_failure=False)
        max_epochs = OmegaConf.select(cfg, "trainer.max_epochs", throw_on_resolution_failure=False)
    except Exception:  # unreadable config: still list the run
        pass
    kind = conv_type(int(groups), bool(use_flgc)) if groups is not None else "unknown"
    error_file = path.parent.parent / ERROR_FILE
    if error_file.is_file():  # a user error (bad config, missing data) stopped it; cli.py recorded which
        return RunRow(name, kind, groups, None, None, None, None, None, 0, max_epochs, None, "failed",
                      error_file.read_text(errors="replace").strip() or "unknown error")
    return RunRow(name, kind, groups, None, None, None, None, None, 0, max_epochs, None, "failed/unknown",
                  "no summary.json: the run stopped before training started")


def read_run(run_dir: Path, root: Path) -> RunRow:
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            row = _from_summary(name, json.loads(summary_path.read_text()), run_overrides(run_dir))
        except (ValueError, TypeError) as err:
            row = RunRow(name, "unknown", None, None, None, None, None, None, None, None, None,
                         "failed/unknown", f"unreadable summary.json: {err}")
    else:
        row = _from_hydra_config(name, run_dir / ".hydra" / "config.yaml")
    overrides = run_overrides(run_dir)
    if overrides is None:  # a run without Hydra's record: what the summary says it is
        overrides = [f"conv_type={row.conv_type}", f"groups={row.groups}"]
    row.config_key = _keys(overrides, SEED_KEYS) or f"conv_type={row.conv_type} groups={row.groups}"
    row.shared_key = _keys(overrides, SEED_KEYS + ARM_KEYS + ("conv_type",))
    if row.seed is None:
        row.seed = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("seed=")
                         and o.split("=", 1)[1].lstrip("-").isdigit()), None)
    return row


def collect(root: Path) -> list[RunRow]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"'{root}' is not a directory; pass a multirun directory, e.g. multirun/<date>/<time>")
    rows = [read_run(d, root) for d in find_run_dirs(root)]
    if not rows:
        raise UserError(f"no runs under '{root}' (no summary.json or .hydra/config.yaml found)")
    order = {k: i for i, k in enumerate(CONV_TYPES)}
    natural = lambda name: tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in Path(name).parts)  # noqa: E731
    return sorted(rows, key=lambda r: (order.get(r.conv_type, len(CONV_TYPES)), r.conv_type, r.groups or 0,
                                       natural(r.run)))
