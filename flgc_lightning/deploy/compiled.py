"""``torch.compile`` of a deployed network, with the CPU settings that ran fastest here (benchmarks/README.md).

``freezing`` turns the weights into constants, so inductor pre-packs them for oneDNN and fuses each conv
with its bias, ReLU6 and residual add; the fused FLGC layers stay single custom-op nodes
(:mod:`flgc_lightning.deploy.ops`). Call the result under ``torch.inference_mode()`` with channels_last
inputs; ``dynamic=False`` compiles once per input shape (per batch size).
"""
from __future__ import annotations

import torch
from torch import nn

from flgc_lightning.deploy.grouped import refresh_tables
from flgc_lightning.utils.inductor import pin_cpu_vector_width

COMPILE_OPTIONS = {"freezing": True}


def compile_deployed(model: nn.Module, dynamic: bool = False, **options) -> nn.Module:
    """``torch.compile(model)`` with :data:`COMPILE_OPTIONS` (overridable); compiled on the first call. Inductor's cache
    is keyed by this CPU's vector width (:func:`~flgc_lightning.utils.inductor.pin_cpu_vector_width`)."""
    refresh_tables(model)
    pin_cpu_vector_width()
    return torch.compile(model.eval(), dynamic=dynamic, options={**COMPILE_OPTIONS, **options})
