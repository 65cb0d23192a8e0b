"""Lightning callback that records how FLGC channels move between groups, epoch by epoch.

At fit start it records the initial assignment (epoch -1) and at the end of every
training epoch one record per FLGC layer (see :mod:`flgc_lightning.assignments.changes`),
appended to ``<run dir>/assignments.jsonl``, and it logs summary scalars. A model without
``Flgc2d`` layers makes it a no-op.

Resume: the previous epoch's group ids live in the callback's checkpoint state (plain
ints, so checkpoints still load with ``weights_only=True``). On resume, records newer than
that state (written after the checkpoint, before a crash) are dropped; the epochs after
the checkpoint are then recorded again. A checkpoint taken inside an epoch (every N steps,
or on validation end, before this callback's epoch-end hook) holds the state of the epoch
before, and Lightning runs that epoch's end hooks again after restoring it. Records after
kill + resume equal those of an uninterrupted run (tests/test_assignments.py).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch import nn

from flgc_lightning.assignments.changes import layer_groups_many, layer_record
from flgc_lightning.assignments.diagnostics import GradNormMeter, margins, runner_up, runner_up_moves
from flgc_lightning.assignments.records import RECORDS_FILENAME, append_records, read_records, rewrite_records
from flgc_lightning.layers.flgc import Flgc2d

log = logging.getLogger(__name__)

INITIAL_EPOCH = -1  # epoch number of the assignment before any training step


def flgc_layers(module: nn.Module) -> list[tuple[str, Flgc2d]]:
    """FLGC layers in module order; their position in this list is the layer number."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, Flgc2d)]


class AssignmentTracker(Callback):
    """Record group sizes and channel moves of every FLGC layer at each training epoch end.

    Args:
        filename: records file, relative to ``run_dir``.
        run_dir: directory of the records file; ``None`` = the trainer's ``default_root_dir``.
        log_scalars: log ``assign/layerNN/moved_inputs|moved_filters``, ``assign/moved_total``,
            ``assign/empty_groups`` and ``assign/ever_moved`` (channels that changed group at least
            once since the start, as seen at epoch ends) to the active loggers.
    """

    def __init__(self, filename: str = RECORDS_FILENAME, run_dir: Optional[str] = None, log_scalars: bool = True):
        self.filename = filename
        self.run_dir = run_dir
        self.log_scalars = log_scalars
        self.path: Optional[Path] = None
        self._layers: list[tuple[str, Flgc2d]] = []
        self._previous: Optional[list[tuple[np.ndarray, np.ndarray]]] = None
        self._last_epoch: Optional[int] = None
        self._ever_moved: Optional[list[tuple[np.ndarray, np.ndarray]]] = None  # per layer: inputs, filters
        self._restored: Optional[dict] = None
        # Diagnostics: each channel's runner-up group at initialisation, and per layer the moves seen so far
        # (inputs moved, of them to the init runner-up, filters moved, of them to the init runner-up).
        self._init_runner_up: Optional[list[tuple[np.ndarray, np.ndarray]]] = None
        self._moves: Optional[list[list[int]]] = None
        self._grad_norms = GradNormMeter()
        self._last_diagnostics: list[dict] = []

    # ---- group ids -------------------------------------------------------------------------
    def _current_ids(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Group ids of every layer's inputs and filters (each layer's own rule, one device-to-host copy)."""
        return layer_groups_many([layer for _, layer in self._layers])

    @property
    def ever_moved(self) -> int:
        """Channels (inputs and filters, all layers) that changed group at least once, seen at epoch ends."""
        return int(sum(i.sum() + f.sum() for i, f in self._ever_moved or []))

    def _records(self, epoch: int, step: int, current: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
        previous = self._previous or [(None, None)] * len(current)
        return [
            layer_record(epoch=epoch, step=step, layer=i, name=name, num_groups=layer.num_groups,
                         inputs=cur_in, filters=cur_out, previous_inputs=prev_in, previous_filters=prev_out)
            for i, ((name, layer), (cur_in, cur_out), (prev_in, prev_out)) in enumerate(
                zip(self._layers, current, previous))
        ]

    def _diagnose(self, records: list[dict], current: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Add each record's diagnostics: logit margins, gradient norms since the last record, runner-up moves."""
        norms = self._grad_norms.read(len(self._layers))
        if self._moves is None:
            self._moves = [[0, 0, 0, 0] for _ in self._layers]
        previous = self._previous or [(None, None)] * len(current)
        for i, (record, (_, layer)) in enumerate(zip(records, self._layers)):
            for j, (side, logits) in enumerate((("inputs", layer.in_assign), ("filters", layer.out_assign))):
                entry = record[side]
                entry.update(margins(logits))
                entry["grad_norm"] = norms[i][j]
                entry["moved_to_init_runner_up"] = None
                if previous[i][j] is not None and self._init_runner_up is not None:
                    moved, to_runner_up = runner_up_moves(previous[i][j], current[i][j], self._init_runner_up[i][j])
                    entry["moved_to_init_runner_up"] = to_runner_up
                    self._moves[i][2 * j] += moved
                    self._moves[i][2 * j + 1] += to_runner_up
        self._last_diagnostics = records

    def _advance(self, trainer: pl.Trainer, epoch: int, current: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
        """Record ``epoch`` against the previous assignment and make ``current`` the new previous."""
        records = self._records(epoch, trainer.global_step, current)
        if epoch == INITIAL_EPOCH:
            self._init_runner_up = [(runner_up(layer.in_assign), runner_up(layer.out_assign)) for _, layer in self._layers]
            self._moves = None
        self._diagnose(records, current)
        if self._previous is None or self._ever_moved is None:
            self._ever_moved = [(np.zeros(len(i), bool), np.zeros(len(f), bool)) for i, f in current]
        else:
            self._ever_moved = [(ever_i | (i != pi), ever_f | (f != pf)) for (ever_i, ever_f), (i, f), (pi, pf)
                                in zip(self._ever_moved, current, self._previous)]
        self._previous, self._last_epoch = current, epoch
        if trainer.is_global_zero:
            append_records(self.path, records)
        return records

    # ---- hooks -----------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after a resume has restored weights, loops and this callback's state.
        self._layers = flgc_layers(getattr(pl_module, "net", pl_module))
        restored, self._restored = self._restored, None
        if not self._layers:
            return
        self.path = Path(self.run_dir or trainer.default_root_dir) / self.filename
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if restored and self._matches(restored):
            self._previous = [(np.asarray(s["inputs"]), np.asarray(s["filters"])) for s in restored["layers"]]
            self._ever_moved = [(np.asarray(s.get("ever_inputs", np.zeros(len(s["inputs"]))), bool),
                                 np.asarray(s.get("ever_filters", np.zeros(len(s["filters"]))), bool))
                                for s in restored["layers"]]
            self._last_epoch = int(restored["epoch"])
            if restored.get("grad_norms"):
                self._grad_norms.load_state_dict(restored["grad_norms"], pl_module.device)
            if all("runner_up_inputs" in s for s in restored["layers"]):
                self._init_runner_up = [(np.asarray(s["runner_up_inputs"]), np.asarray(s["runner_up_filters"]))
                                        for s in restored["layers"]]
                self._moves = [list(s["moves"]) for s in restored["layers"]]
            self._keep_records_up_to(trainer, self._last_epoch)
        elif trainer.current_epoch > 0:
            # Resumed from a checkpoint without tracker state: restart the chain from the current weights.
            log.warning("AssignmentTracker: checkpoint has no assignment state; records restart at epoch %d",
                        trainer.current_epoch - 1)
            self._keep_records_up_to(trainer, trainer.current_epoch - 2)
            self._previous = None
            self._advance(trainer, trainer.current_epoch - 1, self._current_ids())
        else:
            self._previous = None
            if trainer.is_global_zero:
                rewrite_records(self.path, [])
            self._advance(trainer, INITIAL_EPOCH, self._current_ids())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        learning = [layer for _, layer in self._layers if layer.learn_assignments]
        if learning:
            self._grad_norms.update(learning)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._layers:
            return
        records = self._advance(trainer, trainer.current_epoch, self._current_ids())
        if self.log_scalars:
            scalars = {**self.summary_scalars(records), "assign/ever_moved": float(self.ever_moved)}
            pl_module.log_dict(scalars, on_step=False, on_epoch=True)

    def diagnostics(self) -> dict[str, Any]:
        """For ``summary.json``: channels ever moved (inputs, filters), the share of moves that went to the
        init runner-up, and the last record's gradient norms and margins (mean over layers)."""
        if not self._layers or self._ever_moved is None:
            return {}

        def mean(side: str, key: str) -> Optional[float]:
            values = [r[side][key] for r in self._last_diagnostics if r[side].get(key) is not None]
            return float(np.mean(values)) if values else None

        moves = np.asarray(self._moves or [[0, 0, 0, 0]], dtype=np.int64).sum(0)
        share = lambda moved, to_ru: (float(to_ru) / moved) if moved else None  # noqa: E731
        return {
            "channels_ever_moved_inputs": int(sum(i.sum() for i, _ in self._ever_moved)),
            "channels_ever_moved_filters": int(sum(f.sum() for _, f in self._ever_moved)),
            "moves_inputs": int(moves[0]), "moves_filters": int(moves[2]),
            "runner_up_share_inputs": share(moves[0], moves[1]),
            "runner_up_share_filters": share(moves[2], moves[3]),
            **{f"{key}_{side}": mean(side, key) for side in ("inputs", "filters")
               for key in ("grad_norm", "margin_median", "margin_q10")},
        }

    @staticmethod
    def summary_scalars(records: list[dict]) -> dict[str, float]:
        scalars = {}
        for r in records:
            scalars[f"assign/layer{r['layer']:02d}/moved_inputs"] = float(r["inputs"]["moved"])
            scalars[f"assign/layer{r['layer']:02d}/moved_filters"] = float(r["filters"]["moved"])
        for side in ("inputs", "filters"):
            for key in ("grad_norm", "margin_median"):
                values = [r[side][key] for r in records if r[side].get(key) is not None]
                if values:
                    scalars[f"assign/{key}_{side}"] = float(np.mean(values))
        scalars["assign/moved_total"] = float(sum(r["inputs"]["moved"] + r["filters"]["moved"] for r in records))
        scalars["assign/empty_groups"] = float(sum(r["num_empty_groups"] for r in records))
        return scalars

    # ---- resume ----------------------------------------------------------------------------
    def _matches(self, state: dict) -> bool:
        layers = state.get("layers") or []
        return len(layers) == len(self._layers) and all(
            s["name"] == name and len(s["inputs"]) == m.in_channels and len(s["filters"]) == m.out_channels
            for s, (name, m) in zip(layers, self._layers)
        )

    def _keep_records_up_to(self, trainer: pl.Trainer, last_epoch: int) -> None:
        """Drop records newer than ``last_epoch`` (written after the checkpoint we resume from)."""
        if not trainer.is_global_zero or not self.path.is_file():
            return
        records = read_records(self.path)
        kept = [r for r in records if r["epoch"] <= last_epoch]
        if len(kept) != len(records) or self.path.read_bytes()[-1:] not in (b"", b"\n"):
            rewrite_records(self.path, kept)

    def state_dict(self) -> dict[str, Any]:
        if self._previous is None:
            return {}
        return {
            "epoch": self._last_epoch,
            "layers": [{"name": name, "inputs": ins.tolist(), "filters": outs.tolist(),
                        "ever_inputs": ever_i.astype(int).tolist(), "ever_filters": ever_f.astype(int).tolist(),
                        **({} if self._init_runner_up is None else {
                            "runner_up_inputs": self._init_runner_up[k][0].tolist(),
                            "runner_up_filters": self._init_runner_up[k][1].tolist(),
                            "moves": [int(v) for v in (self._moves or [[0, 0, 0, 0]] * len(self._layers))[k]]})}
                       for k, ((name, _), (ins, outs), (ever_i, ever_f))
                       in enumerate(zip(self._layers, self._previous, self._ever_moved))],
            "grad_norms": self._grad_norms.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None
