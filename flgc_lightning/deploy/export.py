"""TorchScript and ONNX export of a deployed network, and an ONNX Runtime cross-check."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from flgc_lightning.deploy.grouped import UnequalGroupConv2d, replace_module


def with_kernel(model: nn.Module, kernel: str | None) -> nn.Module:
    """``model`` itself (``None``), or a copy whose unequal-group layers all use ``kernel``.

    Exports trace stock ops only, so a ``fused`` layer exports as its padded form. ONNX Runtime on
    CPU runs ``blockdiag`` about as fast as dense and ``padded`` about 3x slower (benchmarks/inference.py).
    """
    if kernel is None:
        return model
    if kernel not in ("padded", "blockdiag"):
        raise ValueError(f"export kernel must be 'padded' or 'blockdiag', got {kernel!r}")
    model = copy.deepcopy(model)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, UnequalGroupConv2d) and layer.kernel != kernel:
            replace_module(model, name, layer.rebuilt(kernel))
    return model


def export_torchscript(model: nn.Module, path: str | Path, example: torch.Tensor | None = None,
                       kernel: str | None = None) -> torch.jit.ScriptModule:
    """Trace (the network has no data-dependent control flow) and save.

    Traced with a channels_last example: the channel gathers then take their channels_last path.
    ``kernel``: see :func:`with_kernel`.
    """
    model = with_kernel(model, kernel)
    example = torch.randn(1, 3, 32, 32) if example is None else example
    example = example.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example)
    traced.save(str(path))
    return traced


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor | None = None, opset: int = 17,
                kernel: str | None = None) -> Path:
    """ONNX with a dynamic batch axis (legacy TorchScript-based exporter: no extra dependencies).

    ``kernel``: see :func:`with_kernel`.
    """
    model = with_kernel(model, kernel)
    example = torch.randn(1, 3, 32, 32) if example is None else example
    with torch.no_grad():
        torch.onnx.export(
            model.eval(), (example,), str(path), input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    return Path(path)


def onnxruntime_session(path: str | Path, threads: int = 2):
    """A CPU ONNX Runtime session with ``threads`` intra-op threads that do not spin-wait when idle
    (spinning threads take CPU from whatever runs next in the process)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnxruntime_logits(path: str | Path, images: torch.Tensor, threads: int = 2) -> torch.Tensor:
    session = onnxruntime_session(path, threads)
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.cpu().numpy()})
    return torch.from_numpy(logits)
