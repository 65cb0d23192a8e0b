"""Planted groups: can an estimator find a grouping that is known to exist? (issue 18, a positive control)

A teacher 1x1 conv is block-diagonal with ``G`` groups of unequal sizes, hidden under a random permutation
of its inputs and of its filters, and followed by a train-mode BatchNorm (the situation of every FLGC
projection in the network). A student ``Flgc2d(G) + BatchNorm2d`` starts from N(0, 1) logits and learns
by SGD on the mean squared error to the teacher's outputs on Gaussian inputs. The score is the adjusted
Rand index (ARI, 1 = the planted partition up to renaming, ~0 = chance) of the student's input groups and
of its filter groups; the control is the same student with its random groups frozen.

Optimiser: plain SGD with momentum, as the reference trains (an adaptive optimiser such as Adam would
magnify the eps-sized filter-logit gradients of the reference estimator into real steps, REFERENCE.md
section 7, and flatter every estimator's comparison). ``benchmarks/planted_groups.py`` prints the table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score
from torch import Tensor, nn

from flgc_lightning.layers.flgc import Flgc2d
from flgc_lightning.layers.regroup import regroup
from flgc_lightning.training.assign_schedule import noise_seed


@dataclass(frozen=True)
class Teacher:
    weight: Tensor  # (C_out, C_in), zero outside the planted blocks
    input_groups: np.ndarray  # (C_in,)
    filter_groups: np.ndarray  # (C_out,)

    def __call__(self, x: Tensor) -> Tensor:
        """Train-mode BatchNorm (no affine) of the 1x1 conv: zero mean, unit variance per filter over the batch."""
        return F.batch_norm(F.conv2d(x, self.weight[:, :, None, None]), None, None, training=True)


def unequal_sizes(channels: int, groups: int, rng: np.random.Generator, smallest: int = 2) -> np.ndarray:
    """``groups`` sizes summing to ``channels``, each at least ``smallest``, drawn unequal (sorted: all distinct
    whenever the draw allows)."""
    if channels < groups * smallest:
        raise ValueError(f"{channels} channels cannot make {groups} groups of at least {smallest}")
    while True:
        cuts = np.sort(rng.choice(np.arange(1, channels - groups * (smallest - 1)), groups - 1, replace=False))
        sizes = np.diff(np.concatenate([[0], cuts, [channels - groups * (smallest - 1)]])) + smallest - 1
        if len(set(sizes.tolist())) >= min(groups, 4):
            return sizes


def make_teacher(in_channels: int = 64, out_channels: int = 64, groups: int = 8, seed: int = 0) -> Teacher:
    """Block-diagonal weight (N(0, 1) inside the blocks) with unequal groups on both sides, permuted."""
    rng = np.random.default_rng(seed)
    input_groups = rng.permutation(np.repeat(np.arange(groups), unequal_sizes(in_channels, groups, rng)))
    filter_groups = rng.permutation(np.repeat(np.arange(groups), unequal_sizes(out_channels, groups, rng)))
    connected = filter_groups[:, None] == input_groups[None, :]
    weight = rng.standard_normal((out_channels, in_channels)) * connected
    return Teacher(torch.tensor(weight, dtype=torch.float32), input_groups, filter_groups)


@dataclass(frozen=True)
class StudentConfig:
    """How the student learns. ``logit_lr`` is the SGD learning rate of the assignment logits (weights and
    BatchNorm use ``lr``); Gumbel's temperature goes from ``tau_start`` to ``tau_end`` exponentially over
    the run; ``frozen`` keeps the logits out of the optimiser (with no regrouping: the initial random
    groups, the control); ``regroup_at`` co-clusters ``|W|`` into new groups
    (:mod:`flgc_lightning.layers.regroup`) at these fractions of the run."""

    assign_grad: str = "reference"
    dense_weight_grad: bool = False
    frozen: bool = False
    steps: int = 2000
    batch: int = 256
    lr: float = 0.05
    logit_lr: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 0.0  # of the weights only (BatchNorm and logits: none)
    tau_start: float = 1.0
    tau_end: float = 0.1
    freeze_at: Optional[float] = None  # fraction of the steps after which the groups stop learning
    regroup_at: tuple[float, ...] = ()  # fractions of the steps at which |W| is co-clustered into new groups


@dataclass
class StudentResult:
    ari_inputs: float
    ari_filters: float
    loss: float  # MSE on a fresh batch, after training
    input_groups: np.ndarray = field(repr=False)
    filter_groups: np.ndarray = field(repr=False)


def make_student(teacher: Teacher, groups: int, config: StudentConfig, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    c_out, c_in = teacher.weight.shape
    conv = Flgc2d(c_in, c_out, 1, groups=groups, bias=False, assign_grad=config.assign_grad,
                  dense_weight_grad=config.dense_weight_grad, learn_assignments=not config.frozen)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")  # as MobileNetV2 initialises it
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


def train_student(teacher: Teacher, groups: int = 8, config: StudentConfig = StudentConfig(),
                  seed: int = 0) -> StudentResult:
    """Train one student (plain SGD with momentum, on CPU) and score its groups against the teacher's."""
    student = make_student(teacher, groups, config, seed)
    conv: Flgc2d = student[0]
    logits = [conv.in_assign, conv.out_assign]
    bn = list(student[1].parameters())
    optimizer = torch.optim.SGD([{"params": [conv.weight], "weight_decay": config.weight_decay},
                                 {"params": bn}, {"params": logits, "lr": config.logit_lr}],
                                lr=config.lr, momentum=config.momentum)
    data = torch.Generator().manual_seed(seed + 1)
    noise = torch.Generator()
    c_in = teacher.weight.shape[1]
    freeze_step = None if config.freeze_at is None else int(config.freeze_at * config.steps)
    regroup_steps = {int(f * config.steps) for f in config.regroup_at}
    for step in range(config.steps):
        learning = freeze_step is None or step < freeze_step
        if step in regroup_steps:
            regroup(conv, seed=seed)
        if conv.assign_grad == "gumbel":
            conv.set_gumbel_tau(config.tau_start * (config.tau_end / config.tau_start) ** (step / config.steps))
            conv.refresh_gumbel_noise(noise.manual_seed(noise_seed(seed, step, 0)) if learning else None)
        x = torch.randn(config.batch, c_in, 1, 1, generator=data)
        loss = F.mse_loss(student(x), teacher(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not learning:
            for p in logits:
                p.grad = None
        optimizer.step()
    with torch.no_grad():
        x = torch.randn(4096, c_in, 1, 1, generator=data)
        final = F.mse_loss(student(x), teacher(x)).item()
    ins, outs = conv.input_groups().numpy(), conv.filter_groups().numpy()
    return StudentResult(float(adjusted_rand_score(teacher.input_groups, ins)),
                         float(adjusted_rand_score(teacher.filter_groups, outs)), final, ins, outs)


def describe(result: StudentResult) -> str:
    return f"ARI inputs {result.ari_inputs:.3f}, filters {result.ari_filters:.3f}, loss {result.loss:.4f}"
