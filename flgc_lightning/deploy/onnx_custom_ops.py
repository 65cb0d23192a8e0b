"""The fused kernel as one ONNX custom op (domain ``ai.onnx.contrib``): what the ONNX file holds.

ONNX Runtime's convs only know equal groups, so in stock ops an FLGC layer costs at least a dense conv
(block-diagonal weight). Written as this op instead, each whole inverted-residual block is one node that
ONNX Runtime hands to our C kernel (:mod:`flgc_lightning.deploy.onnxruntime_ops`), the same kernel and the same
step as ``torch.ops.flgc.fused_step``:

``FlgcStep(x, residual, ints, floats) -> y``: one step of :mod:`flgc_lightning.deploy.tables` (an expand 1x1 conv,
dense or FLGC, + ReLU6, depthwise 3x3 + ReLU6, FLGC projection [+ residual] [+ ReLU6]; or the same without expand
conv; or one FLGC 1x1 conv), its header, tables and weights the two tensors ``ints`` (int64) and ``floats``.
``residual`` is an empty tensor when the block has none; attribute ``residual_is_x`` (1: the residual is ``x``
itself, an identity shortcut, which then does not travel twice).

Its tensors are channels-last (N, H, W, C): the kernel's layout, so consecutive blocks pass their outputs
on without a transpose; the exporter puts ``Transpose`` nodes only where a stock op (the stem conv, the last
1x1 conv) meets a custom one.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx.defs import OpSchema

DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions runs Python-defined ops of this domain
VERSION = 1
OP_TYPE = "FlgcStep"
INPUTS = ("x", "residual", "ints", "floats")
NHWC, NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def _schema() -> OpSchema:
    param = OpSchema.FormalParameter
    return OpSchema(
        OP_TYPE, DOMAIN, VERSION, doc=__doc__.split("\n\n")[2],
        inputs=[param(name, "I" if name == "ints" else "T") for name in INPUTS],
        outputs=[param("y", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32 activations and weights"),
                          ("I", ["tensor(int64)"], "header and kernel tables")],
        attributes=[OpSchema.Attribute("residual_is_x", OpSchema.AttrType.INT, "")])


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: ``torch.ops.flgc.fused_step`` as
    the node above, between transposes to and from channels-last (onnxscript is only needed to export)."""
    import onnxscript
    step = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, VERSION), OP_TYPE, _schema())
    op = onnxscript.opset18
    none = onnx.numpy_helper.from_array(np.zeros(0, np.float32), "no_residual")

    def fused_step(x, ints, floats, residual=None, out_channels=0, stride=1):
        same = residual is not None and residual.name == x.name
        r = op.Constant(value=none) if residual is None or same else op.Transpose(residual, perm=NHWC)
        y = step(op.Transpose(x, perm=NHWC), r, ints, floats, residual_is_x=int(same))
        return op.Transpose(y, perm=NCHW)

    return {torch.ops.flgc.fused_step.default: fused_step}


def cancel_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop ``Transpose(NCHW) -> Transpose(NHWC)`` pairs between custom ops (the pair is the identity), so
    consecutive blocks pass channels-last tensors directly; ``value_info`` of the rewired tensors is dropped."""
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    perm = {n.output[0]: list(next(a.ints for a in n.attribute if a.name == "perm"))
            for n in graph.node if n.op_type == "Transpose" and n.domain in ("", "ai.onnx")}
    rename = {}
    for n in graph.node:
        if n.op_type == "Transpose" and perm.get(n.output[0]) == NHWC and n.input[0] in perm:
            inner = producer[n.input[0]]
            if perm[n.input[0]] == NCHW:
                rename[n.output[0]] = inner.input[0]
    graph_outputs = {o.name for o in graph.output}
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    used, keep = set(graph_outputs), []
    for n in reversed(list(graph.node)):  # consumers before producers: a dropped consumer frees its producer
        if n.domain in ("", "ai.onnx") and n.op_type == "Transpose" and not used & set(n.output):
            continue
        keep.append(n)
        used |= set(n.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    kept_values = {name for n in graph.node for name in (*n.input, *n.output)}
    value_info = [v for v in graph.value_info if v.name in kept_values]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    return model


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
