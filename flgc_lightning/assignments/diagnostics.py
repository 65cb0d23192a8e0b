"""Why assignments move or don't: logit margins, runner-up moves and the gradient reaching the logits.

Three facts of the reference estimator (README, "Do the groups learn?") leave traces these numbers show:
filters get no gradient behind a train-mode BatchNorm (the filter-logit gradient norm is ~0), and an input
channel can only leave for its runner-up at initialisation (every move goes to that group). A margin
(top logit minus the second) far above the logits' step size means the assignment will not move soon.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


def runner_up(logits: Tensor | np.ndarray) -> np.ndarray:
    """The second-best group of every row (by logit; ties: the lower index after the best)."""
    values = torch.as_tensor(logits).detach().float().cpu()
    order = torch.argsort(values, dim=1, descending=True, stable=True)
    return order[:, min(1, values.shape[1] - 1)].numpy()


def margins(logits: Tensor | np.ndarray) -> dict[str, float]:
    """Top-two logit margin of every row: median and 10 % quantile (the channels closest to moving)."""
    values = torch.as_tensor(logits).detach().float().cpu()
    if values.shape[1] < 2:
        return {"margin_median": float("inf"), "margin_q10": float("inf")}
    top = torch.topk(values, k=2, dim=1).values
    gap = (top[:, 0] - top[:, 1]).numpy()
    return {"margin_median": float(np.median(gap)), "margin_q10": float(np.quantile(gap, 0.1))}


def runner_up_moves(previous: np.ndarray, current: np.ndarray, init_runner_up: np.ndarray) -> tuple[int, int]:
    """``(moved, moved to the init runner-up)`` between two assignments of one side."""
    moved = np.asarray(previous) != np.asarray(current)
    return int(moved.sum()), int((moved & (np.asarray(current) == np.asarray(init_runner_up))).sum())


class GradNormMeter:
    """Mean per step of the gradient norm reaching each layer's input and filter logits.

    Accumulated on the device (two foreach kernels per step, no host sync) and read once per epoch.
    """

    def __init__(self) -> None:
        self._sum: Optional[Tensor] = None
        self.steps = 0

    def update(self, layers: Sequence) -> None:
        grads = [side.grad for layer in layers for side in (layer.in_assign, layer.out_assign)]
        if not grads or any(g is None for g in grads):
            return
        norms = torch.stack(torch._foreach_norm(grads)).float()
        self._sum = norms if self._sum is None else self._sum + norms
        self.steps += 1

    def state_dict(self) -> dict:
        """Plain numbers (checkpoints load with ``weights_only=True``): a mid-epoch checkpoint keeps the partial sums."""
        return {"sum": None if self._sum is None else self._sum.cpu().tolist(), "steps": self.steps}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self._sum = None if state.get("sum") is None else torch.tensor(state["sum"], dtype=torch.float32, device=device)
        self.steps = int(state.get("steps", 0))

    def read(self, layers: int) -> list[tuple[Optional[float], Optional[float]]]:
        """Per layer ``(inputs, filters)`` mean norms since the last read (None without steps), and reset."""
        if self._sum is None or not self.steps:
            values = [(None, None)] * layers
        else:
            mean = (self._sum / self.steps).cpu().tolist()
            values = list(zip(mean[0::2], mean[1::2]))
        self._sum, self.steps = None, 0
        return values
