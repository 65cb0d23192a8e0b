"""The fused kernels as ONNX custom ops (domain ``ai.onnx.contrib``): what the ONNX file holds.

ONNX Runtime's convs only know equal groups, so in stock ops an FLGC layer costs at least a dense conv
(block-diagonal weight). Written as these ops instead, each whole inverted-residual block is one node that
ONNX Runtime hands to our C kernel (:mod:`flgc_lightning.deploy.onnxruntime_ops`), the same kernel the
``torch.ops.flgc`` custom ops run:

- ``FlgcInvertedResidual``: expand 1x1 conv (dense or FLGC) + ReLU6, depthwise 3x3 + ReLU6, FLGC projection
  [+ residual] [+ ReLU6] (``torch.ops.flgc.inverted_residual_unequal_group``);
- ``FlgcDepthwiseProjection``: the same without expand conv (``torch.ops.flgc.depthwise_unequal_group_conv``);
- ``FlgcConv1x1``: one FLGC 1x1 conv [+ residual] [+ ReLU6] (``torch.ops.flgc.unequal_group_conv1x1``).

Their tensors are channels-last (N, H, W, C): the kernel's layout, so consecutive blocks pass their outputs
on without a transpose; the exporter puts ``Transpose`` nodes only where a stock op (the stem conv, the last
1x1 conv) meets a custom one. Inputs: ``x``, ``residual`` (an empty tensor when the block has none), then the
kernel's tables (:func:`flgc_lightning.deploy.native.pack`; ``e_*`` the expand conv's, ``dw_taps`` 9 x C);
attributes ``stride``, ``relu6`` (0/1) and ``residual_is_x`` (1: the residual is ``x`` itself, an identity
shortcut, which then does not travel twice). Output channels = ``len(out_index)``.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx.defs import OpSchema

DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions runs Python-defined ops of this domain
VERSION = 1
TABLES = ("weight", "bias", "tasks", "segments", "out_index")
INT_TABLES = {"tasks", "segments", "out_index"}
# op type -> (input names, int attributes)
OPS = {
    "FlgcInvertedResidual": (("x", "residual", *("e_" + t for t in TABLES), "dw_taps", "dw_bias", *TABLES),
                             ("stride", "relu6", "residual_is_x")),
    "FlgcDepthwiseProjection": (("x", "residual", "dw_taps", "dw_bias", *TABLES), ("stride", "relu6", "residual_is_x")),
    "FlgcConv1x1": (("x", "residual", *TABLES), ("relu6", "residual_is_x")),
}
NHWC, NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def _schema(op_type: str) -> OpSchema:
    inputs, attributes = OPS[op_type]
    param = OpSchema.FormalParameter
    return OpSchema(
        op_type, DOMAIN, VERSION, doc=__doc__.split("\n\n")[1],
        inputs=[param(name, "I" if name.removeprefix("e_") in INT_TABLES else "T") for name in inputs],
        outputs=[param("y", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32 activations and weights"),
                          ("I", ["tensor(int64)"], "kernel tables")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in attributes])


def _ops():
    """onnxscript ops for the exporter, built on first use (onnxscript is only needed to export)."""
    import onnxscript
    opset = onnxscript.values.Opset(DOMAIN, VERSION)
    return {name: onnxscript.values.Op(opset, name, _schema(name)) for name in OPS}, onnxscript.opset18


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: the ``torch.ops.flgc`` ops as
    the nodes above, between transposes to and from channels-last."""
    custom, op = _ops()
    none = onnx.numpy_helper.from_array(np.zeros(0, np.float32), "no_residual")

    def node(op_type, x, residual, tables, **attributes):
        same = residual is not None and residual.name == x.name
        r = op.Constant(value=none) if residual is None or same else op.Transpose(residual, perm=NHWC)
        y = custom[op_type](op.Transpose(x, perm=NHWC), r, *tables, residual_is_x=int(same), **attributes)
        return op.Transpose(y, perm=NCHW)

    def block(x, e_weight, e_bias, e_tasks, e_segments, e_out_index, e_dense_weight, e_dense_bias, dw_taps, dw_bias,
              stride, weight, bias, tasks, segments, out_index, dense_weight, dense_bias, residual=None, relu6=False):
        return node("FlgcInvertedResidual", x, residual, (e_weight, e_bias, e_tasks, e_segments, e_out_index, dw_taps,
                                                          dw_bias, weight, bias, tasks, segments, out_index),
                    stride=int(stride), relu6=int(relu6))

    def depthwise(x, dw_taps, dw_bias, stride, weight, bias, tasks, segments, out_index, dense_weight, dense_bias,
                  residual=None, relu6=False):
        return node("FlgcDepthwiseProjection", x, residual, (dw_taps, dw_bias, weight, bias, tasks, segments, out_index),
                    stride=int(stride), relu6=int(relu6))

    def conv1x1(x, weight, bias, tasks, segments, out_index, dense_weight, dense_bias, residual=None, relu6=False):
        return node("FlgcConv1x1", x, residual, (weight, bias, tasks, segments, out_index), relu6=int(relu6))

    return {torch.ops.flgc.inverted_residual_unequal_group.default: block,
            torch.ops.flgc.depthwise_unequal_group_conv.default: depthwise,
            torch.ops.flgc.unequal_group_conv1x1.default: conv1x1}


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
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in OPS]
