"""ONNX Runtime kernels of the custom ops in :mod:`flgc_lightning.deploy.onnx_custom_ops`, and the session helper.

The ops run through onnxruntime-extensions' Python custom ops: importing this module registers them, and a
session whose options register ``onnxruntime_extensions.get_library_path()`` finds them. ONNX Runtime's own
custom-op C API would need its C header, which neither the onnxruntime wheel nor any package reachable here
ships (benchmarks/README.md). Each op calls the compiled C kernel (:mod:`flgc_lightning.deploy.native`) on
the tensors in place, or, without a C compiler, the same stock-op fallback as the ``torch.ops.flgc`` ops.

onnxruntime-extensions copies every input of a Python op on every call, the weights included (a few MB per
network). :func:`session` therefore moves the weights of every custom node into this process once, when the
session is made (checked: tables that would make the kernel read out of bounds are refused), and runs a copy
of the graph in which each chain of consecutive custom nodes is one node (``FlgcChainCached``: one C call for
all its kernels, intermediate tensors never through ONNX Runtime) and any other custom node takes only its
activations and the key of its weights (``<op>Cached``): that is what makes the file faster than the dense
network in ONNX Runtime. A plain ``InferenceSession`` on the file (extensions library registered, this module
imported) gives the same numbers, more slowly.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from flgc_lightning.deploy import native, ops
from flgc_lightning.deploy.onnx_custom_ops import INT_TABLES, OPS, TABLES, custom_nodes

_weights: dict[str, dict[str, torch.Tensor]] = {}  # key of a "<op>Cached" node -> its tables
_keys = itertools.count()


def _nchw(a: np.ndarray) -> torch.Tensor:
    """An N, H, W, C array as the N, C, H, W channels_last tensor the kernels take (no copy)."""
    return torch.from_numpy(a).permute(0, 3, 1, 2)


class _Output(np.ndarray):
    """An op's output. onnxruntime-extensions hands a Python op's result to its C++ side as
    ``result.flatten().tolist()``, a Python list of floats (about 65 ns per value: 130 ms for one activation
    tensor at batch 64), which that side then turns back into an array. Its C++ side takes any array, so
    ``tolist`` here gives the array itself: one memcpy instead."""

    def flatten(self, order="C"):
        return self.reshape(-1)

    def tolist(self):
        return self.view(np.ndarray)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).contiguous().numpy().view(_Output)


def _tables(values: dict[str, np.ndarray | torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {t: torch.as_tensor(values[prefix + t]) for t in TABLES}


def unpack(tables: dict[str, torch.Tensor], in_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``C_out x C_in`` weight and the bias that :func:`native.pack` tables apply (for the fallback)."""
    out_index, tasks, segments = tables["out_index"], tables["tasks"].tolist(), tables["segments"].tolist()
    weight = torch.zeros(len(out_index), in_channels)
    bias = torch.zeros(len(out_index))
    for (first_seg, n_seg, b_at, n_filters, o_at, _), lanes in zip(tasks, native.task_lanes(tables).tolist()):
        filters = out_index[o_at:o_at + n_filters]
        bias[filters] = tables["bias"][b_at:b_at + n_filters]
        for first, length, w_at in segments[first_seg:first_seg + n_seg]:
            block = tables["weight"][w_at:w_at + length * lanes].reshape(length, lanes)
            weight[filters, first:first + length] += block[:, :n_filters].t()  # zero outside the group's lanes
    return weight, bias


def _dense(tables: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """``tables`` with the fallback's ``dense_weight``/``dense_bias`` (built once per cached node)."""
    if "dense_weight" not in tables:
        tables["dense_weight"], tables["dense_bias"] = unpack(tables, in_channels)
    return tables


def _compute(op_type: str, xt: torch.Tensor, res: torch.Tensor | None, tables: dict, stride: int,
             relu6: int) -> torch.Tensor:
    """One custom op on N, C, H, W channels_last tensors: the compiled kernel, or without it the stock-op fallback."""
    _check_input(op_type, tables, xt.shape[1])
    t = tables["projection"]
    out_channels, relu6 = len(t["out_index"]), bool(relu6)
    if op_type == "FlgcConv1x1":
        if native.available():
            return native.unequal_group_conv1x1(xt, t, out_channels, res, relu6)
        t = _dense(t, xt.shape[1])
        return ops.reference(xt, t["dense_weight"], t["dense_bias"], res, relu6)
    taps, dw_bias = tables["dw_taps"], tables["dw_bias"]
    hidden = taps.shape[1]
    if op_type == "FlgcDepthwiseProjection":
        if native.available():
            return native.depthwise_unequal_group_conv(xt, taps, dw_bias, stride, t, out_channels, res, relu6)
        hid = ops.depthwise_reference(xt, taps, dw_bias, stride)
        t = _dense(t, hidden)
        return ops.reference(hid, t["dense_weight"], t["dense_bias"], res, relu6)
    e = tables["expand"]
    if native.available():
        return native.inverted_residual_unequal_group(xt, e, hidden, taps, dw_bias, stride, t, out_channels, res, relu6)
    e, t = _dense(e, xt.shape[1]), _dense(t, hidden)
    hid = ops.depthwise_reference(ops.reference(xt, e["dense_weight"], e["dense_bias"], None, True), taps, dw_bias,
                                  stride)
    return ops.reference(hid, t["dense_weight"], t["dense_bias"], res, relu6)


def _run(op_type: str, x: np.ndarray, residual: np.ndarray, tables: dict, stride: int, relu6: int,
         residual_is_x: int) -> np.ndarray:
    xt = _nchw(np.ascontiguousarray(x, dtype=np.float32))
    res = xt if residual_is_x else _nchw(np.ascontiguousarray(residual, dtype=np.float32)) if residual.size else None
    return _nhwc(_compute(op_type, xt, res, tables, stride, relu6))


def _plan(chain: dict, shape: tuple[int, ...]) -> dict:
    """The chain as one C call for inputs of ``shape`` (N, H, W, C): step records, output buffers (reused by every
    call with that shape), checked once."""
    n, h, w, c = shape
    sizes, slots = {chain["entry"]: (h, w, c)}, {chain["entry"]: 0}
    records, outputs = [], []
    for op_type, x_name, residual_name, tables, stride, relu6, out_name in chain["steps"]:
        h, w, c = sizes[x_name]
        _check_input(op_type, tables, c)
        if op_type != "FlgcConv1x1" and stride not in (1, 2):
            raise ValueError(f"{op_type}: stride must be 1 or 2, got {stride}")
        ho, wo = (h, w) if op_type == "FlgcConv1x1" else ((h - 1) // stride + 1, (w - 1) // stride + 1)
        t, c_out = tables["projection"], len(tables["projection"]["out_index"])
        if residual_name is not None and sizes[residual_name] != (ho, wo, c_out):
            raise ValueError(f"{op_type}: residual of size {sizes[residual_name]}, output {(ho, wo, c_out)}")
        e = tables.get("expand", t)
        taps, dw_bias = tables.get("dw_taps", t["bias"]), tables.get("dw_bias", t["bias"])
        records.append([native.STEP_KINDS[op_type], slots[x_name], -1 if residual_name is None else slots[residual_name],
                        len(outputs) + 1, c, h, w, stride, ho, wo, int(relu6), c_out, taps.shape[-1],
                        e["weight"].data_ptr(), e["bias"].data_ptr(), e["tasks"].data_ptr(), len(e["tasks"]),
                        e["segments"].data_ptr(), e["out_index"].data_ptr(), taps.data_ptr(), dw_bias.data_ptr(),
                        t["weight"].data_ptr(), t["bias"].data_ptr(), t["tasks"].data_ptr(), len(t["tasks"]),
                        t["segments"].data_ptr(), t["out_index"].data_ptr()])
        outputs.append(torch.empty(n, ho, wo, c_out))
        sizes[out_name], slots[out_name] = (ho, wo, c_out), len(outputs)
    return {"steps": torch.tensor(records, dtype=torch.long).reshape(-1, native.STEP_FIELDS), "outputs": outputs,
            "exit": slots[chain["exit"]], "lock": threading.Lock()}


def _run_chain(x: np.ndarray, chain: dict) -> np.ndarray:
    """Consecutive custom nodes in one call: their intermediate tensors never go through ONNX Runtime. With the
    compiled kernel, one C call for all of them (a Python call per kernel costs as much as a kernel at batch 1)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if native.available() and x.ndim == 4:
        plans = chain.setdefault("plans", {})
        if x.shape not in plans and len(plans) >= 4:  # buffers for at most 4 input shapes
            plans.pop(next(iter(plans)))
        if x.shape not in plans:
            plans[x.shape] = _plan(chain, x.shape)
        plan = plans[x.shape]
        with plan["lock"]:  # its buffers are shared by every call with this shape
            buffers = torch.tensor([x.ctypes.data] + [o.data_ptr() for o in plan["outputs"]], dtype=torch.long)
            native.run_chain(plan["steps"], buffers, x.shape[0], chain.get("threads"))
            return plan["outputs"][plan["exit"] - 1].numpy().copy().view(_Output)
    values = {chain["entry"]: _nchw(x)}
    for op_type, x_name, residual_name, tables, stride, relu6, out_name in chain["steps"]:
        res = None if residual_name is None else values[residual_name]
        values[out_name] = _compute(op_type, values[x_name], res, tables, stride, relu6)
    return _nhwc(values[chain["exit"]])


def _group(op_type: str, values: dict[str, np.ndarray | torch.Tensor]) -> dict:
    """A node's tables by role: ``projection`` (and ``expand``) kernel tables, depthwise taps and bias, checked
    (:func:`native.check_tables`, ``ValueError``) so that no table of a broken file makes the kernel read or write
    out of bounds; ``reads``: the input channels the node needs. The kernels check the tables again before each C
    call, a dict lookup for these same tensors."""
    tables = {"projection": _tables(values)}
    out_channels = len(tables["projection"]["out_index"])  # the op's output width
    reads = native.check_tables(tables["projection"], None, out_channels, f"{op_type}: kernel tables").reads
    if op_type != "FlgcConv1x1":
        taps, dw_bias = torch.as_tensor(values["dw_taps"]), torch.as_tensor(values["dw_bias"])
        hidden = taps.shape[1] if taps.dim() == 2 else -1
        if (taps.shape != (9, hidden) or dw_bias.shape != (hidden,) or reads > hidden
                or taps.dtype != torch.float32 or dw_bias.dtype != torch.float32):
            raise ValueError(f"{op_type}: depthwise weights {tuple(taps.shape)} / {tuple(dw_bias.shape)} do not fit "
                             f"a projection reading {reads} channels")
        tables["dw_taps"], tables["dw_bias"], reads = taps.contiguous(), dw_bias.contiguous(), hidden
    if op_type == "FlgcInvertedResidual":
        tables["expand"] = _tables(values, "e_")
        if len(tables["expand"]["out_index"]) != reads:
            raise ValueError(f"{op_type}: the expand conv writes {len(tables['expand']['out_index'])} channels, the "
                             f"depthwise conv reads {reads}")
        reads = native.check_tables(tables["expand"], None, reads, f"{op_type}: expand conv tables").reads
    tables["reads"] = reads
    return tables


def _check_input(op_type: str, tables: dict, channels: int) -> None:
    exact = op_type == "FlgcDepthwiseProjection"  # the depthwise conv reads every channel
    if channels < tables["reads"] or (exact and channels != tables["reads"]):
        raise ValueError(f"{op_type}: input has {channels} channels, its weights need "
                         f"{'exactly ' if exact else ''}{tables['reads']}")


def _register(op_type: str) -> None:
    names, attributes = OPS[op_type]
    f, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64
    types = [i64 if name.removeprefix("e_") in INT_TABLES else f for name in names]
    attrs = {a: i64 for a in attributes}

    @onnx_op(op_type=op_type, inputs=types, outputs=[f], attrs=attrs)
    def full(*inputs, stride=1, relu6=0, residual_is_x=0):
        values = dict(zip(names, inputs))
        return _run(op_type, values["x"], values["residual"], _group(op_type, values), stride, relu6, residual_is_x)

    @onnx_op(op_type=op_type + "Cached", inputs=[f, f], outputs=[f], attrs={**attrs, "key": PyCustomOpDef.dt_string})
    def cached(x, residual, stride=1, relu6=0, residual_is_x=0, key=""):
        return _run(op_type, x, residual, _weights[key], stride, relu6, residual_is_x)


for _op_type in OPS:
    _register(_op_type)


@onnx_op(op_type="FlgcChainCached", inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float],
         attrs={"key": PyCustomOpDef.dt_string})
def _chain(x, key=""):
    return _run_chain(x, _weights[key])


def session_options(threads: int = 2, spinning: bool = False):
    """CPU session options: ``threads`` intra-op threads, the custom-op library registered. Idle threads do not
    spin by default (they would take the cores from our kernel's OpenMP threads and from whatever runs next)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.register_custom_ops_library(get_library_path())
    native.available()  # build (or find) the kernel now, not inside the session's first run
    return options


def _attributes(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _chains(graph: onnx.GraphProto, custom: list[onnx.NodeProto], no_residual: set[str]) -> list[list[int]]:
    """Runs of consecutive custom nodes (indices into ``graph.node``) that read only one tensor from outside (the
    first node's input) and give only one to the outside (the last node's output)."""
    index = {id(n): i for i, n in enumerate(graph.node)}
    consumers: dict[str, set[int]] = {}
    for i, n in enumerate(graph.node):
        for name in n.input:
            consumers.setdefault(name, set()).add(i)
    outputs = {o.name for o in graph.output}
    chains, current, produced, entry = [], [], set(), None
    for node in custom:
        reads = {node.input[0]} | ({node.input[1]} - no_residual if not _attributes(node).get("residual_is_x") else set())
        if current and reads <= produced | {entry}:
            current.append(index[id(node)])
            produced.add(node.output[0])
            continue
        if len(current) > 1:
            chains.append(current)
        current, produced, entry = ([index[id(node)]], {node.output[0]}, node.input[0]) if reads == {node.input[0]} \
            else ([], set(), None)
    if len(current) > 1:
        chains.append(current)
    valid = []
    for chain in chains:  # trim until only the last output leaves the chain
        while len(chain) > 1:
            members = set(chain)
            leaving = [i for i in chain if graph.node[i].output[0] in outputs
                       or consumers.get(graph.node[i].output[0], set()) - members]
            if leaving == [chain[-1]]:
                valid.append(chain)
                break
            chain = chain[:-1]
    return valid


def _with_cached_weights(model: onnx.ModelProto, threads: int | None = None) -> list[str]:
    """Move every custom node's weights into this process (see the module docstring) and run each chain of
    consecutive custom nodes as one ``FlgcChainCached`` node; the keys of the weights."""
    graph, keys = model.graph, []
    initializers = {t.name: t for t in graph.initializer}
    no_residual = {name for name, t in initializers.items() if list(t.dims) == [0]}
    custom = custom_nodes(model)
    tables = {}
    for node in custom:
        names, _ = OPS[node.op_type]
        values = {}
        for name, value in zip(names[2:], node.input[2:]):
            if value not in initializers:
                raise ValueError(f"custom node {node.name}: input {name} ({value}) is not a stored weight")
            values[name] = numpy_helper.to_array(initializers[value]).copy()
        tables[id(node)] = _group(node.op_type, values)
    nodes = list(graph.node)
    chain_of = {i: chain for chain in _chains(graph, custom, no_residual) for i in chain}
    replaced = []
    for i, node in enumerate(nodes):
        if i in chain_of and i != chain_of[i][-1]:
            continue  # the chain's node takes the place of its last member
        if i in chain_of:
            members = [nodes[j] for j in chain_of[i]]
            steps = []
            for m in members:
                a = _attributes(m)
                residual = m.input[0] if a.get("residual_is_x") else None if m.input[1] in no_residual else m.input[1]
                steps.append((m.op_type, m.input[0], residual, tables[id(m)], a.get("stride", 1), a.get("relu6", 0),
                              m.output[0]))
            key = f"{next(_keys)}"
            _weights[key] = {"entry": members[0].input[0], "exit": node.output[0], "steps": steps, "threads": threads}
            keys.append(key)
            replaced.append(helper.make_node("FlgcChainCached", [members[0].input[0]], [node.output[0]],
                                             name=f"flgc_chain_{key}", domain=node.domain, key=key))
            continue
        if id(node) in tables:
            key = f"{next(_keys)}"
            _weights[key] = tables[id(node)]
            keys.append(key)
            node = helper.make_node(node.op_type + "Cached", node.input[:2], node.output, name=node.name,
                                    domain=node.domain, key=key, **_attributes(node))
        replaced.append(node)
    del graph.node[:]
    graph.node.extend(replaced)
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return keys


def _forget(keys: list[str]) -> None:
    for key in keys:
        _weights.pop(key, None)


def session(path: str | Path, threads: int = 2, spinning: bool = False):
    """An ONNX Runtime CPU session for an ONNX file of the deploy step, custom ops or not: ``threads`` threads for
    ONNX Runtime's ops, or, in a file with custom ops, for our kernels, ONNX Runtime then keeping one thread for
    the few stock ops left (the stem conv, pooling, classifier), so that its pool never competes with the
    kernels' OpenMP threads for the cores (5 % at batch 1)."""
    import onnxruntime as ort
    model = onnx.load(str(path))
    keys = _with_cached_weights(model, threads)
    try:
        result = ort.InferenceSession(model.SerializeToString(), session_options(1 if keys else threads, spinning),
                                      providers=["CPUExecutionProvider"])
    except BaseException:
        _forget(keys)
        raise
    weakref.finalize(result, _forget, keys)  # the weights live as long as the session
    return result

