"""Assignment-change tracking: callback records, resume, tables, report command and pictures.

The Trainer-level tests train a two-layer FLGC net with learning rate 0, so the group
assignment changes only where the test edits the logits, and every record is known exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import run_cli

from flgc_lightning.assignments.changes import layer_groups_many, layer_record
from flgc_lightning.assignments.checkpoints import records_from_checkpoints
from flgc_lightning.assignments.records import RecordsError, read_records
from flgc_lightning.assignments.report import main as report_main
from flgc_lightning.assignments.table import layer_table, network_summary
from flgc_lightning.callbacks import AssignmentTracker
from flgc_lightning.layers.flgc import Flgc2d

REPO = Path(__file__).resolve().parent.parent

# Group ids (inputs, filters) of layer 0 (4 -> 6 channels) and layer 1 (6 -> 2), G = 3.
INITIAL = {0: ([0, 0, 1, 2], [0, 0, 0, 1, 1, 1]), 1: ([0, 1, 2, 0, 1, 2], [0, 1])}
EDITS = {  # epoch -> layer -> new ids, applied at that epoch's start
    0: {0: ([0, 1, 1, 2], [0, 0, 0, 1, 1, 1]), 1: ([0, 1, 2, 0, 1, 2], [2, 1])},
    1: {0: ([2, 1, 1, 2], [0, 0, 0, 1, 1, 2])},
}
# (epoch, layer) -> inputs (sizes, removed, added), filters (sizes, removed, added),
#                   filters_without_inputs, inputs_without_filters
EXPECTED = {
    (-1, 0): (([2, 1, 1], [0, 0, 0], [0, 0, 0]), ([3, 3, 0], [0, 0, 0], [0, 0, 0]), [], [2]),
    (-1, 1): (([2, 2, 2], [0, 0, 0], [0, 0, 0]), ([1, 1, 0], [0, 0, 0], [0, 0, 0]), [], [2]),
    (0, 0): (([1, 2, 1], [1, 0, 0], [0, 1, 0]), ([3, 3, 0], [0, 0, 0], [0, 0, 0]), [], [2]),
    (0, 1): (([2, 2, 2], [0, 0, 0], [0, 0, 0]), ([0, 1, 1], [1, 0, 0], [0, 0, 1]), [], [0]),
    (1, 0): (([0, 2, 2], [1, 0, 0], [0, 0, 1]), ([3, 2, 1], [0, 1, 0], [0, 0, 1]), [0], []),
    (1, 1): (([2, 2, 2], [0, 0, 0], [0, 0, 0]), ([0, 1, 1], [0, 0, 0], [0, 0, 0]), [], [0]),
    (2, 0): (([0, 2, 2], [0, 0, 0], [0, 0, 0]), ([3, 2, 1], [0, 0, 0], [0, 0, 0]), [0], []),
    (2, 1): (([2, 2, 2], [0, 0, 0], [0, 0, 0]), ([0, 1, 1], [0, 0, 0], [0, 0, 0]), [], [0]),
}
STEPS_PER_EPOCH = 2


def set_groups(layer: Flgc2d, inputs: list[int], filters: list[int]) -> None:
    with torch.no_grad():
        layer.in_assign.copy_(nn.functional.one_hot(torch.tensor(inputs), layer.num_groups) * 5.0)
        layer.out_assign.copy_(nn.functional.one_hot(torch.tensor(filters), layer.num_groups) * 5.0)


class TinyNet(pl.LightningModule):
    """Two FLGC layers (or plain convs); checkpoints carry the keys ``load_checkpoint`` expects."""

    def __init__(self, flgc: bool = True):
        super().__init__()
        self.save_hyperparameters()
        if flgc:
            self.net = nn.Sequential(Flgc2d(4, 6, 1, groups=3), nn.ReLU(), Flgc2d(6, 2, 1, groups=3))
            for i, layer in enumerate(self.net[::2]):
                set_groups(layer, *INITIAL[i])
        else:
            self.net = nn.Sequential(nn.Conv2d(4, 6, 1), nn.ReLU(), nn.Conv2d(6, 2, 1))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.net(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # logits change only by EditLogits

    def on_save_checkpoint(self, checkpoint):
        checkpoint["flgc_config"] = {}


class EditLogits(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if not isinstance(pl_module.net[0], Flgc2d):
            return
        for i, (inputs, filters) in EDITS.get(trainer.current_epoch, {}).items():
            set_groups(pl_module.net[2 * i], inputs, filters)


def loader() -> DataLoader:
    data = torch.randn(2 * STEPS_PER_EPOCH, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(data), batch_size=2)


def fit(run_dir: Path, max_epochs: int, ckpt_path=None, flgc=True, save_on_train_epoch_end=True, logger=False):
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="epoch{epoch}", save_top_k=-1,
                                 auto_insert_metric_name=False,
                                 save_last=True, save_on_train_epoch_end=save_on_train_epoch_end)
    torch.manual_seed(0)  # the same weights in every run (the records' gradient norms depend on them)
    trainer = pl.Trainer(default_root_dir=run_dir, max_epochs=max_epochs, accelerator="cpu", logger=logger,
                         callbacks=[EditLogits(), AssignmentTracker(), checkpoint], enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(TinyNet(flgc), train_dataloaders=loader(), val_dataloaders=loader(), ckpt_path=ckpt_path)
    return trainer


def test_logit_edits_give_exactly_the_expected_records(tmp_path):
    trainer = fit(tmp_path, 3, logger=CSVLogger(tmp_path, name="csv"))
    records = read_records(tmp_path / "assignments.jsonl")
    assert [(r["epoch"], r["layer"]) for r in records] == list(EXPECTED)
    for r in records:
        ins, outs, fwi, iwf = EXPECTED[(r["epoch"], r["layer"])]
        for side, (sizes, removed, added) in (("inputs", ins), ("filters", outs)):
            assert (r[side]["sizes"], r[side]["removed"], r[side]["added"]) == (sizes, removed, added), (r, side)
            assert r[side]["moved"] == sum(added) and r[side]["total_diff"] == 2 * sum(added)
        assert r["empty_groups"] == {"filters_without_inputs": fwi, "inputs_without_filters": iwf}
        assert r["step"] == STEPS_PER_EPOCH * (r["epoch"] + 1)
    diagnostics = ("margin_median", "margin_q10", "grad_norm", "moved_to_init_runner_up")
    plain = [{**r, "inputs": {k: v for k, v in r["inputs"].items() if k not in diagnostics},
              "filters": {k: v for k, v in r["filters"].items() if k not in diagnostics}} for r in records]
    assert plain[4] == {  # one record in full: epoch 1, layer 0
        "epoch": 1, "step": 4, "layer": 0, "name": "0", "in_channels": 4, "out_channels": 6, "groups": 3,
        "baseline": False,
        "inputs": {"sizes": [0, 2, 2], "removed": [1, 0, 0], "added": [0, 0, 1], "moved": 1, "total_diff": 2},
        "filters": {"sizes": [3, 2, 1], "removed": [0, 1, 0], "added": [0, 0, 1], "moved": 1, "total_diff": 2},
        "empty_groups": {"filters_without_inputs": [0], "inputs_without_filters": []}, "num_empty_groups": 1,
    }
    # Diagnostics, recomputed independently. Logits are one-hot x 5: every top-two margin is 5.
    assert all(r[side]["margin_median"] == r[side]["margin_q10"] == 5.0 for r in records for side in ("inputs", "filters"))
    # Init runner-up of a one-hot row: group 1 for channels in group 0, else group 0. Moves: epoch 0, layer 0,
    # input 1 went 0 -> 1 (its runner-up); layer 1, filter 0 went 0 -> 2 (not); epoch 1: input 0 went 0 -> 2,
    # filter 5 went 1 -> 2 (neither).
    runner_up_moves = {(r["epoch"], r["layer"]): (r["inputs"]["moved_to_init_runner_up"],
                                                    r["filters"]["moved_to_init_runner_up"]) for r in records}
    assert runner_up_moves == {(-1, 0): (None, None), (-1, 1): (None, None), (0, 0): (1, 0), (0, 1): (0, 0),
                               (1, 0): (0, 0), (1, 1): (0, 0), (2, 0): (0, 0), (2, 1): (0, 0)}
    # Gradient norms: the mean over the epoch's steps of |grad| of each logit matrix, recomputed on a copy of the
    # network with the epoch's logits (the learning rate is 0, so only the edits change anything).
    net = TinyNet().net  # the trained weights (constant at learning rate 0), the logits set below
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict({k[len("net."):]: v for k, v in saved.items()})
    for i, layer in enumerate(net[::2]):
        set_groups(layer, *INITIAL[i])
    for epoch in range(3):
        for i, (inputs, filters) in EDITS.get(epoch, {}).items():
            set_groups(net[2 * i], inputs, filters)
        sums = np.zeros((2, 2))
        for (batch,) in loader():
            net.zero_grad()
            net(batch).pow(2).mean().backward()
            sums += [[net[2 * i].in_assign.grad.norm().item(), net[2 * i].out_assign.grad.norm().item()] for i in range(2)]
        for r in records:
            if r["epoch"] == epoch:
                expected = sums[r["layer"]] / STEPS_PER_EPOCH
                assert np.allclose([r["inputs"]["grad_norm"], r["filters"]["grad_norm"]], expected, rtol=1e-5), (r, expected)
    assert records[0]["inputs"]["grad_norm"] is None  # the initial record: no step yet
    assert records[0]["baseline"] and records[1]["name"] == "2"
    # Summary scalars reached the logger, one row per epoch.
    trainer.logger.finalize("success")
    import csv
    rows = [r for r in csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")) if r.get("assign/moved_total")]
    got = [(int(r["epoch"]), float(r["assign/moved_total"]), float(r["assign/empty_groups"]),
            float(r["assign/layer00/moved_inputs"]), float(r["assign/layer01/moved_filters"])) for r in rows]
    assert got == [(0, 2.0, 2.0, 1.0, 1.0), (1, 2.0, 2.0, 1.0, 0.0), (2, 0.0, 2.0, 0.0, 0.0)]
    # Checkpoint state is plain ints: loads with weights_only=True and holds the last epoch's ids.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["callbacks"]["AssignmentTracker"]
    assert state == {"epoch": 2, "layers": [
        {"name": "0", "inputs": [2, 1, 1, 2], "filters": [0, 0, 0, 1, 1, 2],
         "ever_inputs": [1, 1, 0, 0], "ever_filters": [0, 0, 0, 0, 0, 1],  # channels that ever changed group
         "runner_up_inputs": [1, 1, 0, 0], "runner_up_filters": [1, 1, 1, 0, 0, 0], "moves": [2, 1, 1, 0]},
        {"name": "2", "inputs": [0, 1, 2, 0, 1, 2], "filters": [2, 1],
         "ever_inputs": [0, 0, 0, 0, 0, 0], "ever_filters": [1, 0],
         "runner_up_inputs": [1, 0, 0, 1, 0, 0], "runner_up_filters": [1, 0], "moves": [0, 0, 1, 0]}],
        "grad_norms": {"sum": None, "steps": 0}}  # read and reset at each epoch end
    tracker = next(c for c in trainer.callbacks if isinstance(c, AssignmentTracker))
    summary = tracker.diagnostics()
    assert (summary["channels_ever_moved_inputs"], summary["channels_ever_moved_filters"]) == (2, 2)
    assert (summary["moves_inputs"], summary["runner_up_share_inputs"]) == (2, 0.5)
    assert (summary["moves_filters"], summary["runner_up_share_filters"]) == (2, 0.0)
    ever = [float(r["assign/ever_moved"]) for r in csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv"))
            if r.get("assign/ever_moved")]
    assert ever == [2.0, 4.0, 4.0]


def test_group_ids_of_many_layers_follow_each_layers_own_rule(tmp_path):
    """One host copy for all layers; learned/frozen layers use argmax, balanced layers their equal-size rule."""
    from flgc_lightning.layers import BalancedFlgc2d

    torch.manual_seed(0)
    layers = [Flgc2d(7, 5, 1, groups=3), BalancedFlgc2d(8, 12, 1, groups=4),
              Flgc2d(9, 4, 1, groups=3, learn_assignments=False)]
    with torch.no_grad():
        layers[0].in_assign.copy_((layers[0].in_assign * 2).round() / 2)  # many exact ties
        layers[0].out_assign[0] = 1.0  # a whole row tied: group 0
    ids = layer_groups_many(layers)
    for layer, (inputs, filters) in zip(layers, ids):
        assert inputs.tolist() == layer.input_groups().tolist()
        assert filters.tolist() == layer.filter_groups().tolist()
    assert ids[0][1][0] == 0 and len(ids[2][0]) == 9
    assert np.bincount(ids[1][0]).tolist() == [2, 2, 2, 2] and np.bincount(ids[1][1]).tolist() == [3, 3, 3, 3]


def test_model_without_flgc_writes_nothing(tmp_path):
    fit(tmp_path, 1, flgc=False)
    assert not (tmp_path / "assignments.jsonl").exists()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["callbacks"].get("AssignmentTracker", {}) == {}


@pytest.mark.parametrize("save_on_train_epoch_end", [True, False])
def test_records_after_kill_and_resume_equal_an_uninterrupted_run(tmp_path, save_on_train_epoch_end):
    """Resume from epoch 0's checkpoint after epoch 1 was recorded and a line was half written.

    With ``save_on_train_epoch_end=False`` the checkpoint is taken at validation end, before the
    tracker's epoch-end hook (like a mid-epoch checkpoint): it holds the init state, and epoch 0's
    record comes from the epoch-end hooks Lightning runs again after the restore.
    """
    whole, split = tmp_path / "whole", tmp_path / "split"
    fit(whole, 3, save_on_train_epoch_end=save_on_train_epoch_end)
    fit(split, 2, save_on_train_epoch_end=save_on_train_epoch_end)
    records = split / "assignments.jsonl"
    with open(records, "a") as fh:
        fh.write('{"epoch": 2, "layer": 0, "inpu')  # killed mid-write
    epoch0 = torch.load(split / "checkpoints" / "epoch0.ckpt", map_location="cpu", weights_only=True)
    assert epoch0["callbacks"]["AssignmentTracker"]["epoch"] == (0 if save_on_train_epoch_end else -1)
    fit(split, 3, ckpt_path=split / "checkpoints" / "epoch0.ckpt", save_on_train_epoch_end=save_on_train_epoch_end)
    assert records.read_text() == (whole / "assignments.jsonl").read_text()
    epochs = [r["epoch"] for r in read_records(records)]
    assert epochs == [-1, -1, 0, 0, 1, 1, 2, 2]


def test_resume_from_a_checkpoint_without_tracker_state_restarts_the_chain(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    fit(whole, 3)
    fit(split, 1)
    ckpt = torch.load(split / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["callbacks"]["AssignmentTracker"]
    torch.save(ckpt, split / "stateless.ckpt")
    fit(split, 3, ckpt_path=split / "stateless.ckpt")
    records, expected = read_records(split / "assignments.jsonl"), read_records(whole / "assignments.jsonl")
    assert [(r["epoch"], r["baseline"]) for r in records] == [
        (-1, True), (-1, True), (0, True), (0, True), (1, False), (1, False), (2, False), (2, False)]
    # Epochs 1 and 2 compare with epoch 0's ids as before; without the checkpoint's init state the runner-ups at
    # initialisation are unknown (None), the rest is equal.
    def known(r):
        return {**r, **{side: {k: v for k, v in r[side].items() if k != "moved_to_init_runner_up"}
                        for side in ("inputs", "filters")}}
    assert [known(r) for r in records[4:]] == [known(r) for r in expected[4:]]
    assert all(r[side]["moved_to_init_runner_up"] is None for r in records[4:] for side in ("inputs", "filters"))
    assert [r["inputs"]["sizes"] for r in records[2:4]] == [r["inputs"]["sizes"] for r in expected[2:4]]


def known_sequence() -> list[dict]:
    ids = [([0, 0, 1, 1, 2], [0, 1, 1]), ([0, 1, 1, 1, 2], [0, 1, 1]), ([2, 1, 1, 1, 2], [0, 1, 2])]
    records, prev = [], (None, None)
    for epoch, (ins, outs) in zip((-1, 0, 1), ids):
        records.append(layer_record(epoch=epoch, step=epoch + 1, layer=0, name="features.1.conv.1.0", num_groups=3,
                                    inputs=np.array(ins), filters=np.array(outs),
                                    previous_inputs=prev[0], previous_filters=prev[1]))
        prev = (np.array(ins), np.array(outs))
    return records


def test_table_of_a_known_sequence():
    records = known_sequence()
    assert layer_table(records, 0, "inputs") == (
        "layer 0 (features.1.conv.1.0, 5->3 channels, G=3): inputs, cells -removed/+added/size vs the previous row\n"
        "epoch       g0       g1       g2  Total diff.\n"
        "init   -0/+0/2  -0/+0/2  -0/+0/1            0\n"
        "0      -1/+0/1  -0/+1/3  -0/+0/1            2\n"
        "1      -1/+0/0  -0/+0/3  -0/+1/2            2"
    )
    assert layer_table(records, 0, "filters") == (
        "layer 0 (features.1.conv.1.0, 5->3 channels, G=3): filters, cells -removed/+added/size vs the previous row\n"
        "epoch       g0       g1       g2  Total diff.\n"
        "init   -0/+0/1  -0/+0/2  -0/+0/0            0\n"
        "0      -0/+0/1  -0/+0/2  -0/+0/0            0\n"
        "1      -0/+0/1  -1/+0/1  -0/+1/1            2"
    )
    assert network_summary(records) == (
        "1 FLGC layers, epochs init..1; moved = channels that changed group (last epoch / all epochs)\n"
        "layer  module               in->out  G  last  moved inputs  moved filters  empty  input sizes  filter sizes\n"
        "0      features.1.conv.1.0     5->3  3     1           1/2            1/1      1        0 3 2         1 1 1"
    )


def test_report_command_tables_pictures_and_checkpoints(tmp_path, capsys):
    fit(tmp_path, 3)
    report_main([str(tmp_path), "--layer", "0", "--filters", "--plot"])
    out = capsys.readouterr().out
    assert "\n1      -0/+0/3  -1/+0/2  -0/+1/1            2\n" in out  # filter 5 moved g1 -> g2 in epoch 1
    assert "empty groups at epoch 2: filters but no inputs: g0" in out
    pictures = [tmp_path / "assignment_plots" / f"layer00_{kind}.png" for kind in ("movement", "blocks")]
    for png in pictures:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report_main([str(tmp_path), "--plot", "--out", str(tmp_path / "pics")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 FLGC layers, epochs init..2") and len(lines) == 5  # title, header, 2 layers, wrote
    assert (tmp_path / "pics" / "overview.png").stat().st_size > 10_000

    # From checkpoints (epoch0, epoch1, epoch2 and last): epoch 0 is the baseline row.
    from_ckpts = records_from_checkpoints(tmp_path / "checkpoints")
    tracked = {(r["epoch"], r["layer"]): r for r in read_records(tmp_path / "assignments.jsonl")}
    assert [(r["epoch"], r["layer"]) for r in from_ckpts] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    for r in from_ckpts:
        expected = tracked[(r["epoch"], r["layer"])]
        assert r["name"] == expected["name"] and r["inputs"]["sizes"] == expected["inputs"]["sizes"]
        if r["epoch"] > 0:  # the same records, logit margins recomputed from the saved logits included
            for side in ("inputs", "filters"):
                assert r[side] == {k: v for k, v in expected[side].items()
                                   if k not in ("grad_norm", "moved_to_init_runner_up")}
            assert r["empty_groups"] == expected["empty_groups"]
    report_main(["--from-checkpoints", str(tmp_path / "checkpoints"), "--layer", "1"])
    assert capsys.readouterr().out.splitlines()[2] == "0      -0/+0/2  -0/+0/2  -0/+0/2            0"


def test_report_errors_are_user_errors(tmp_path):
    with pytest.raises(RecordsError, match="no assignment records"):
        report_main([str(tmp_path)])
    (tmp_path / "assignments.jsonl").write_text("not json\n{}\n")
    with pytest.raises(RecordsError, match="line 1 is not a JSON record"):
        report_main([str(tmp_path)])
    proc = run_cli("-m", "flgc_lightning.assignments", str(tmp_path / "nope"), "--layer", "3", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: no assignment records at") and not proc.stdout


@pytest.mark.slow
def test_train_py_records_continue_across_resume(tmp_path, capsys, cifar_subset):
    """Real command lines on real images: 1 epoch, resume to 2, then the report."""
    run = tmp_path / "run"
    common = [f"data.root={cifar_subset}", "data.limit_train=64", "data.limit_test=64",
              "data.batch_size=64", "trainer.accelerator=cpu", "logger=csv", "++trainer.enable_progress_bar=false"]

    def cli(*args):
        proc = run_cli(*args, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cli("train.py", "model.use_flgc=true", "groups=8", "trainer.max_epochs=1", *common, f"hydra.run.dir={run}")
    cli("train.py", "trainer.max_epochs=2", *common, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    records = read_records(run / "assignments.jsonl")
    assert [(r["epoch"], r["layer"]) for r in records] == [(e, l) for e in (-1, 0, 1) for l in range(17)]
    assert all(r["groups"] == 8 and sum(r["inputs"]["sizes"]) == r["in_channels"] for r in records)
    metrics = (next((run / "csv").glob("version_1/metrics.csv"))).read_text()
    assert "assign/layer16/moved_filters" in metrics and "assign/empty_groups" in metrics

    report_main([str(run)])
    out = capsys.readouterr().out
    assert out.startswith("17 FLGC layers, epochs init..1") and "features.17.conv.2.0  960->320  8" in out
    report_main([str(run), "--layer", "16", "--filters", "--plot"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("layer 16 (features.17.conv.2.0, 960->320 channels, G=8): filters")
    assert [row.split()[0] for row in table[2:5]] == ["init", "0", "1"]
    assert all(sum(int(cell.split("/")[2]) for cell in row.split()[1:9]) == 320 for row in table[2:5])
    for kind in ("movement", "blocks"):
        assert (run / "assignment_plots" / f"layer16_{kind}.png").stat().st_size > 10_000
