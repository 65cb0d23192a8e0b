"""Export of a deployed network: ``torch.export`` programs (``.pt2``), ONNX, and ONNX Runtime sessions.

- ``.pt2`` (:func:`export_program`): ``torch.export`` with a dynamic batch axis. Fused FLGC layers stay
  one ``torch.ops.flgc.fused_step`` node per block; loading needs that op registered, which
  ``import flgc_lightning.deploy.ops`` does (and nothing else of this package).
- ONNX (:func:`export_onnx`): the current (``torch.export``-based, "dynamo") exporter. By default each fused
  block or layer is one custom op (:mod:`flgc_lightning.deploy.onnx_custom_ops`) that ONNX Runtime runs with our
  C kernel (:func:`onnxruntime_session`); in stock ONNX ops only, FLGC layers are written as block-diagonal
  dense convs (the fastest stock form in ONNX Runtime, at dense cost).
- TorchScript is gone: ``torch.jit.trace``/``torch.jit.load`` are deprecated (FutureWarning since torch
  2.14), and ``.pt2`` covers what it offered (a file that runs without the model's Python code).
"""
from __future__ import annotations

import copy
from pathlib import Path

import onnx
import torch
from torch import nn

from flgc_lightning.deploy.onnx_custom_ops import cancel_transposes, custom_nodes, translation_table
from flgc_lightning.deploy.grouped import UnequalGroupConv2d, refresh_tables

ONNX_KERNELS = UnequalGroupConv2d.KERNELS


def with_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """A copy whose unequal-group layers all use ``kernel``."""
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, UnequalGroupConv2d):
            layer.kernel = kernel
    return model


def _one_group(conv: nn.Module, relu6: bool = False) -> UnequalGroupConv2d | None:
    """A dense 1x1 conv (stride 1, no padding) as a one-group fused layer with the same weights, else ``None``."""
    if not (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
            and conv.padding == (0, 0)):
        return None
    zeros_in = torch.zeros(conv.in_channels, dtype=torch.long)
    zeros_out = torch.zeros(conv.out_channels, dtype=torch.long)
    return UnequalGroupConv2d(conv.weight.detach()[:, :, 0, 0], conv.bias, zeros_in, zeros_out, 1, "fused", relu6)


def _fused_neighbours(model: nn.Module) -> nn.Module:
    """A copy whose dense 1x1 convs next to fused blocks run the fused kernel as one group: the shortcut convs of
    blocks that change width at stride 1, and the head conv (+ ReLU6) after the last block. In an ONNX file they
    are then custom ops too, in the same chain as the blocks, so the activations stay channels-last instead of
    being transposed for ONNX Runtime's conv and back (same numbers)."""
    from flgc_lightning.deploy.blocks import DeployedInvertedResidual
    model = copy.deepcopy(model)

    def fused(block) -> bool:
        return (isinstance(block, DeployedInvertedResidual) and block.can_fuse_depthwise()
                and block.projection.kernel == "fused")

    for block in model.modules():
        if fused(block) and isinstance(block.shortcut, nn.Sequential) and len(block.shortcut) == 1:
            layer = _one_group(block.shortcut[0])
            if layer is not None:
                block.shortcut[0] = layer
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and len(features) >= 2 and fused(features[-2]):
        head = features[-1]
        if isinstance(head, nn.Sequential) and len(head) == 2 and isinstance(head[1], nn.ReLU6):
            layer = _one_group(head[0], relu6=True)
            if layer is not None:
                features[-1] = nn.Sequential(layer)
    return model


def _portable_copy(model: nn.Module) -> nn.Module:
    """A copy with contiguous (NCHW-strided) weights: the exporters' weight packing mistakes a channels_last
    3x3 weight for a slice of a larger tensor and warns. Same numbers; inputs may still be channels_last. Its fused
    steps are built (tracing takes them as they are), and the convs they run hold their weights as plain tensors,
    not parameters: a program then holds those weights once, in the steps (``torch.export`` writes every parameter,
    read or not)."""
    from flgc_lightning.deploy.blocks import DeployedInvertedResidual

    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.contiguous()
    refresh_tables(model)
    for m in model.modules():
        inside = []
        if isinstance(m, DeployedInvertedResidual) and m.can_fuse_depthwise() and m.projection.kernel == "fused":
            inside = [m.projection.conv, m.conv[-2][0], *([m.conv[0][0]] if m.can_fuse_block() else [])]
        elif isinstance(m, UnequalGroupConv2d) and m.kernel == "fused":
            inside = [m.conv]
        for conv in (c.conv if isinstance(c, UnequalGroupConv2d) else c for c in inside):
            for name, value in list(conv.named_parameters(recurse=False)):
                del conv._parameters[name]
                setattr(conv, name, value.detach())
    return model


def _example(example: torch.Tensor | None, input_size) -> torch.Tensor:
    example = torch.randn(2, *input_size) if example is None else example
    if example.shape[0] == 1:  # a batch of 1 would be specialised by torch.export's shape analysis
        example = example.expand(2, *example.shape[1:]).clone()
    return example.contiguous(memory_format=torch.channels_last)


def export_program(model: nn.Module, path: str | Path | None = None, example: torch.Tensor | None = None,
                   input_size=(3, 32, 32)) -> torch.export.ExportedProgram:
    """``torch.export`` program of ``model`` with a dynamic batch; saved to ``path`` (``.pt2``) if given.

    Load with :func:`~flgc_lightning.deploy.load_program` (checks the file first: ``torch.export.load`` alone runs
    code a file chooses, so never use it on a file from someone else).
    """
    model = _portable_copy(model)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.export.export(model, (_example(example, input_size),), dynamic_shapes=({0: batch},))
    if path is not None:
        torch.export.save(program, str(path))
    return program


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor | None = None, kernel: str = "fused",
                input_size=(3, 32, 32)) -> Path:
    """ONNX (``images`` -> ``logits``, dynamic batch) through the ``torch.export``-based exporter.

    ``kernel``: how FLGC layers are written. ``"fused"``: as the network runs them in PyTorch, every block or
    layer the fused kernel runs as one custom op (run the file with :func:`onnxruntime_session`); layers on
    other kernels and dense ones stay stock ops. ``"blockdiag"`` (stock ops only): dense convs with zeros outside
    the groups.
    """
    if kernel not in ONNX_KERNELS:
        raise ValueError(f"ONNX export kernel must be one of {ONNX_KERNELS}, got {kernel!r}")
    model = _portable_copy(with_kernel(model, kernel) if kernel != "fused" else _fused_neighbours(model))
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.onnx.export(model, (_example(example, input_size),), None, input_names=["images"],
                                    output_names=["logits"], opset_version=18, dynamo=True,
                                    dynamic_shapes=({0: batch},), verbose=False,
                                    custom_translation_table=translation_table())
    exported = program.model_proto
    onnx.save(cancel_transposes(exported) if custom_nodes(exported) else exported, str(path))
    return Path(path)


def onnxruntime_session(path: str | Path, threads: int = 2, spinning: bool = False):
    """A CPU ONNX Runtime session for any ONNX file :func:`export_onnx` wrote: ``threads`` intra-op threads,
    full graph optimisation, the custom ops registered (:mod:`flgc_lightning.deploy.onnxruntime_ops`). By
    default idle threads do not spin-wait (spinning threads take CPU from whatever runs next in the process);
    ``spinning=True`` is ONNX Runtime's own default, for a process that runs nothing else."""
    from flgc_lightning.deploy import onnxruntime_ops
    return onnxruntime_ops.session(path, threads, spinning)


def onnxruntime_logits(path: str | Path, images: torch.Tensor, threads: int = 2) -> torch.Tensor:
    session = onnxruntime_session(path, threads)
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.contiguous().cpu().numpy()})
    return torch.from_numpy(logits)
