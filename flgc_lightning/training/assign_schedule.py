"""When FLGC assignments learn, and the Gumbel noise and temperature of each training step.

Everything here is a function of host integers only (run seed, epoch, global step, layer index), so
a resumed run recomputes exactly what the uninterrupted one used and nothing needs saving.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

from flgc_lightning.layers.flgc import Flgc2d


@dataclass(frozen=True)
class AssignSchedule:
    """The ``assign_optim`` schedule keys (defaults: today's behaviour, assignments always learn).

    Args:
        warmup_epochs: assignments do not learn in epochs ``< warmup_epochs``.
        freeze_epoch: from this epoch on assignments are frozen (``None``: never).
        tau_start / tau_end: Gumbel-softmax temperature, annealed exponentially from start to end ...
        tau_epochs: ... over this many epochs (``None``: the trainer's ``max_epochs``), constant after.
        regroup_epochs: at the start of these epochs every learning FLGC layer is regrouped by co-clustering
            its weight magnitudes (:mod:`flgc_lightning.layers.regroup`; useful with ``dense_weight_grad``).
    """

    warmup_epochs: int = 0
    freeze_epoch: Optional[int] = None
    tau_start: float = 1.0
    tau_end: float = 0.1
    tau_epochs: Optional[int] = None
    regroup_epochs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "regroup_epochs", tuple(self.regroup_epochs))  # a config list, hashable
        if not self.warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if self.freeze_epoch is not None and not self.freeze_epoch > self.warmup_epochs:
            raise ValueError(f"freeze_epoch must be > warmup_epochs ({self.warmup_epochs}) or null, "
                             f"got {self.freeze_epoch!r}")
        for name in ("tau_start", "tau_end"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.tau_epochs is not None and not self.tau_epochs >= 1:
            raise ValueError(f"tau_epochs must be >= 1 or null, got {self.tau_epochs!r}")
        if any(not e >= 0 for e in self.regroup_epochs):
            raise ValueError(f"regroup_epochs must be epochs >= 0, got {list(self.regroup_epochs)!r}")
        if self.freeze_epoch is not None and any(e > self.freeze_epoch for e in self.regroup_epochs):
            raise ValueError(f"regroup_epochs must be <= freeze_epoch ({self.freeze_epoch}): groups are frozen "
                             f"after it, got {list(self.regroup_epochs)!r}")

    @classmethod
    def from_options(cls, options: dict) -> "AssignSchedule":
        """The schedule keys of an ``assign_optim`` mapping (other keys, e.g. ``lr_mult``, are not ours)."""
        return cls(**{f.name: options[f.name] for f in dataclasses.fields(cls) if f.name in options})

    def learning(self, epoch: int) -> bool:
        """Whether assignments learn (and Gumbel noise is drawn) in ``epoch``."""
        return epoch >= self.warmup_epochs and (self.freeze_epoch is None or epoch < self.freeze_epoch)

    def regroups(self, epoch: int) -> bool:
        """Whether the layers are regrouped at the start of ``epoch``."""
        return epoch in self.regroup_epochs

    def tau(self, epoch: int, max_epochs: Optional[int]) -> float:
        """``tau_start * (tau_end / tau_start) ** min(epoch / span, 1)``; without a span (no ``tau_epochs``
        and no positive ``max_epochs``) the temperature stays at ``tau_start``."""
        span = self.tau_epochs if self.tau_epochs is not None else max_epochs
        if not span or span < 1:
            return float(self.tau_start)
        return float(self.tau_start * (self.tau_end / self.tau_start) ** min(epoch / span, 1.0))


def noise_seed(run_seed: int, step: int, layer: int) -> int:
    """A 63-bit generator seed for one layer at one step, well mixed (no collisions between nearby triples)."""
    words = [int(run_seed) & 0xFFFFFFFFFFFFFFFF, int(step), int(layer)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def refresh_assignment_noise(layers: Iterable[tuple[int, Flgc2d]], schedule: AssignSchedule, run_seed: int,
                             step: int, epoch: int, max_epochs: Optional[int]) -> None:
    """Gumbel noise and temperature of every ``(layer index, layer)`` for one training step (layers with
    another estimator are skipped).

    Noise only while assignments learn (zero in warm-up and after the freeze: the network trains its
    current groups). Drawn on each layer's device with a generator seeded by :func:`noise_seed`: no host
    sync (seeding a generator and filling buffers are asynchronous), same values after a resume.
    """
    tau = schedule.tau(epoch, max_epochs)
    learning = schedule.learning(epoch)
    generators: dict[torch.device, torch.Generator] = {}
    for index, layer in layers:
        if layer.assign_grad != "gumbel":
            continue
        layer.set_gumbel_tau(tau)
        generator = None
        if learning:
            device = layer.gumbel_in.device
            generator = generators.setdefault(device, torch.Generator(device=device))
            generator.manual_seed(noise_seed(run_seed, step, index))
        layer.refresh_gumbel_noise(generator)
