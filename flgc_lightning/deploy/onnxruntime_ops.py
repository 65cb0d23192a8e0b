"""ONNX Runtime kernels of the custom ops in :mod:`flgc_lightning.deploy.onnx_custom_ops`, and the session helper.

The ops run through onnxruntime-extensions' Python custom ops: importing this module registers them, and a
session whose options register ``onnxruntime_extensions.get_library_path()`` finds them. ONNX Runtime's own
custom-op C API would need its C header, which neither the onnxruntime wheel nor any package reachable here
ships (benchmarks/README.md). Each op calls the compiled C kernel (:mod:`flgc_lightning.deploy.native`) on
the tensors in place, or, without a C compiler, the same stock-op fallback as ``torch.ops.flgc.fused_step``
(:func:`flgc_lightning.deploy.ops.apply`).

onnxruntime-extensions copies every input of a Python op on every call, the weights included (a few MB per
network). :func:`session` therefore moves the weights of every custom node into this process once, when the
session is made (checked: tables that would make the kernel read out of bounds are refused), and runs a copy
of the graph in which each chain of consecutive custom nodes is one node (``FlgcChainCached``: one C call for
all its kernels, intermediate tensors never through ONNX Runtime) and any other custom node takes only its
activations and the key of its weights (``FlgcStepCached``): that is what makes the file faster than the dense
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
from flgc_lightning.deploy.onnx_custom_ops import DOMAIN, INPUTS, OP_TYPE, custom_nodes
from flgc_lightning.deploy.native import STEP_FIELDS
from flgc_lightning.deploy.tables import Step, TableError, checked_step
from flgc_lightning.errors import UserError

class OnnxFileError(UserError, ValueError):
    """An ONNX file that is not one the deploy step writes: it would make the session read other files, run other
    operators, or it holds custom nodes of an older version."""


_weights: dict[str, Step | dict] = {}  # key of a "FlgcStepCached" node -> its step; of a chain -> the chain
_keys = itertools.count()
OLD_OP_TYPES = {"FlgcInvertedResidual", "FlgcDepthwiseProjection", "FlgcConv1x1"}  # before the one-step format


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


def _run(step: Step, x: np.ndarray, residual: np.ndarray, residual_is_x: int) -> np.ndarray:
    xt = _nchw(np.ascontiguousarray(x, dtype=np.float32))
    res = xt if residual_is_x else _nchw(np.ascontiguousarray(residual, dtype=np.float32)) if residual.size else None
    return _nhwc(ops.apply(step, xt, res))


def _plan(chain: dict, shape: tuple[int, ...]) -> dict:
    """The chain as one C call for inputs of ``shape`` (N, H, W, C): step records, output buffers (reused by every
    call with that shape), checked once."""
    n, h, w, c = shape
    sizes, slots = {chain["entry"]: (h, w, c)}, {chain["entry"]: 0}
    records, outputs = [], []
    for step, x_name, residual_name, out_name in chain["steps"]:
        h, w, c = sizes[x_name]
        if c != step.in_channels:
            raise TableError(f"{OP_TYPE}: input has {c} channels, its weights need {step.in_channels}")
        out = (*step.output_size(h, w), step.out_channels)
        if residual_name is not None and sizes[residual_name] != out:
            raise TableError(f"{OP_TYPE}: residual of size {sizes[residual_name]}, output {out}")
        records.append(step.record(slots[x_name], len(outputs) + 1,
                                   -1 if residual_name is None else slots[residual_name], h, w))
        outputs.append(torch.empty(n, *out))
        sizes[out_name], slots[out_name] = out, len(outputs)
    return {"steps": torch.cat(records) if records else torch.zeros(0, STEP_FIELDS, dtype=torch.long), "outputs": outputs,
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
            buffers = [x.ctypes.data] + [o.data_ptr() for o in plan["outputs"]]
            native.run_chain(plan["steps"], buffers, x.shape[0], chain.get("threads"))
            return plan["outputs"][plan["exit"] - 1].numpy().copy().view(_Output)
    values = {chain["entry"]: _nchw(x)}
    for step, x_name, residual_name, out_name in chain["steps"]:
        res = None if residual_name is None else values[residual_name]
        values[out_name] = ops.apply(step, values[x_name], res)
    return _nhwc(values[chain["exit"]])


def _step(ints: np.ndarray | torch.Tensor, floats: np.ndarray | torch.Tensor) -> Step:
    """The node's step, checked (:func:`~flgc_lightning.deploy.tables.checked_step`, :class:`TableError`) so that no
    table of a broken file makes the kernel read or write out of bounds."""
    return checked_step(torch.as_tensor(ints), torch.as_tensor(floats))


@onnx_op(op_type=OP_TYPE, inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64,
                                  PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float],
         attrs={"residual_is_x": PyCustomOpDef.dt_int64})
def _full(x, residual, ints, floats, residual_is_x=0):
    return _run(_step(ints, floats), x, residual, residual_is_x)


@onnx_op(op_type=OP_TYPE + "Cached", inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
         outputs=[PyCustomOpDef.dt_float], attrs={"residual_is_x": PyCustomOpDef.dt_int64, "key": PyCustomOpDef.dt_string})
def _cached(x, residual, residual_is_x=0, key=""):
    return _run(_weights[key], x, residual, residual_is_x)


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


def _contents(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Every node and every stored tensor of ``model``: its graph, graphs nested in node attributes (control-flow
    bodies) and its functions."""
    nodes, tensors = [], []

    def visit(graph_nodes, stored) -> None:
        tensors.extend(stored)
        for node in graph_nodes:
            nodes.append(node)
            for a in node.attribute:
                tensors.extend([a.t] * a.HasField("t") + list(a.tensors))
                for graph in [a.g] * a.HasField("g") + list(a.graphs):
                    visit(graph.node, [*graph.initializer, *(s.values for s in graph.sparse_initializer)])

    visit(model.graph.node, [*model.graph.initializer, *(s.values for s in model.graph.sparse_initializer)])
    for function in model.functions:
        visit(function.node, [])
    return nodes, tensors


def _check_file(model: onnx.ModelProto) -> None:
    """Refuse what a file of the deploy step never holds and what would make a session read or run more than the
    file: tensors stored in other files (``external_data``: the session would read whatever path the file names),
    and any operator but ONNX's own and ``FlgcStep`` (onnxruntime-extensions registers many more in our domain,
    tokenizers and decoders among them, and the session's own rewritten ops name weights of other sessions)."""
    nodes, tensors = _contents(model)
    if any(t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) for t in tensors):
        raise OnnxFileError("the ONNX file keeps tensors in other files (external data), which a file of the deploy "
                         "step never does; refused")
    old = {n.op_type for n in nodes if n.domain == DOMAIN} & OLD_OP_TYPES
    if old:
        raise OnnxFileError(f"the ONNX file has custom nodes of an older flgc_lightning ({', '.join(sorted(old))}), "
                         "which this version does not run: export it again (python -m flgc_lightning.deploy CKPT "
                         "--out DIR --onnx)")
    other = {f"{n.domain}::{n.op_type}" for n in nodes
             if n.domain not in ("", "ai.onnx") and (n.domain, n.op_type) != (DOMAIN, OP_TYPE)}
    if other:
        raise OnnxFileError(f"the ONNX file has {', '.join(sorted(other))} nodes; a file of the deploy step has only "
                         f"ONNX operators and {DOMAIN}::{OP_TYPE}; refused")


def _with_cached_weights(model: onnx.ModelProto, threads: int | None = None) -> list[str]:
    """Move every custom node's weights into this process (see the module docstring) and run each chain of
    consecutive custom nodes as one ``FlgcChainCached`` node; the keys of the weights."""
    graph, keys = model.graph, []
    initializers = {t.name: t for t in graph.initializer}
    no_residual = {name for name, t in initializers.items() if list(t.dims) == [0]}
    custom = custom_nodes(model)
    step_of = {}
    for node in custom:
        values = {}
        for name, value in zip(INPUTS[2:], node.input[2:]):
            if value not in initializers:
                raise TableError(f"custom node {node.name}: input {name} ({value}) is not a stored weight")
            values[name] = numpy_helper.to_array(initializers[value]).copy()
        if len(values) != 2:
            raise TableError(f"custom node {node.name}: {len(node.input)} inputs, {OP_TYPE} has {len(INPUTS)}")
        step_of[id(node)] = _step(values["ints"], values["floats"])
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
                steps.append((step_of[id(m)], m.input[0], residual, m.output[0]))
            key = f"{next(_keys)}"
            _weights[key] = {"entry": members[0].input[0], "exit": node.output[0], "steps": steps, "threads": threads}
            keys.append(key)
            replaced.append(helper.make_node("FlgcChainCached", [members[0].input[0]], [node.output[0]],
                                             name=f"flgc_chain_{key}", domain=node.domain, key=key))
            continue
        if id(node) in step_of:
            key = f"{next(_keys)}"
            _weights[key] = step_of[id(node)]
            keys.append(key)
            node = helper.make_node(OP_TYPE + "Cached", node.input[:2], node.output, name=node.name,
                                    domain=node.domain, key=key, residual_is_x=_attributes(node).get("residual_is_x", 0))
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
    model = onnx.load(str(path), load_external_data=False)
    _check_file(model)
    keys = _with_cached_weights(model, threads)
    try:
        result = ort.InferenceSession(model.SerializeToString(), session_options(1 if keys else threads, spinning),
                                      providers=["CPUExecutionProvider"])
    except BaseException:
        _forget(keys)
        raise
    weakref.finalize(result, _forget, keys)  # the weights live as long as the session
    return result

