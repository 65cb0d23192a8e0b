"""The fused kernel's tables: packed from a layer's weights, laid out as one *step*, checked, and computed with
stock ops.

A deployed layer keeps its weights once (:class:`~flgc_lightning.deploy.grouped.UnequalGroupConv2d`: a 1x1 conv,
zero between groups); everything here is derived from them:

- :func:`pack`: a 1x1 conv restricted to groups as the C kernel's tables (tasks, segments, out_index, weight, bias);
- :func:`make_step`: what one kernel call computes -- an unequal-group 1x1 conv, a 3x3 depthwise conv feeding one,
  or a whole inverted-residual block -- as two tensors: ``ints`` (a header and every index table) and ``floats``
  (every weight). The custom op ``torch.ops.flgc.fused_step``, ``.pt2`` programs and ONNX files all carry a step
  as these two tensors and nothing else;
- :func:`checked_step`: the header and tables checked against everything the C code indexes, once per pair of
  tensors, before any C code sees them (:class:`TableError` otherwise);
- :meth:`Step.reference`: the step with stock PyTorch ops (block-diagonal dense convs): the one fallback where the
  compiled kernel is not available, the same numbers.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from flgc_lightning.deploy import native
from flgc_lightning.deploy.native import LANES, WIDE_LANES

TASK_FIELDS, SEGMENT_FIELDS = 6, 3  # T_LEN, S_LEN in the C source
CONSECUTIVE, WIDE = 1, 2  # task flags (T_FLAGS): outputs are consecutive channels; 16 lanes


def task_lanes(tables: dict[str, Tensor]) -> Tensor:
    """Vector lanes (8 or 16) of each task of :func:`pack`'s tables."""
    return torch.where(tables["tasks"][:, 5] & WIDE != 0, WIDE_LANES, LANES)


def _runs(channels: list[int]) -> list[tuple[int, int]]:
    """Sorted channel indices as ``(first, length)`` runs of consecutive channels."""
    runs: list[list[int]] = []
    for c in channels:
        if runs and runs[-1][0] + runs[-1][1] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    return [(a, n) for a, n in runs]


def pack(weight: Tensor, bias: Tensor | None, in_groups: Tensor, out_groups: Tensor,
         num_groups: int, windows: bool = False) -> dict[str, Tensor]:
    """The kernel's tables for a ``C_out x C_in`` 1x1 weight restricted to groups.

    A "task" is one vector of 8 accumulators: up to 8 filters, of one group or of several
    consecutive small groups (a group of more than 8 filters takes several tasks; see ``lanes`` for 16). Each group in a
    task reads its inputs as runs of consecutive channels (one run when the deploy step made the
    group contiguous), each run with a ``[run length][8]`` weight block that is zero in the lanes of
    the task's other groups. Packing small groups together costs no extra multiply-adds (a task
    costs one vector FMA per input it reads, however many lanes are used) and saves per-task work
    on layers with a few filters per group. A group without inputs gives its filters' bias; inputs
    of a group without filters are never read. A task whose 8 filters are 8 consecutive output channels
    writes each row with one vector store instead of 8 scalar ones (what makes the paper variant's FLGC
    expand convs, 18 outputs per 3 inputs, fast: the deploy step orders their outputs by group).

    ``windows=True``: each task is instead the next 8 output channels in order, whatever groups they belong
    to, reading the inputs of every group among them, so every full task stores with vector stores. For
    layers with a few inputs per group and outputs in group order (FLGC expand convs: 2-3 inputs per group
    in the first blocks), the stores cost more than the extra multiply-adds.

    Groups of more than 8 filters take wide tasks of up to 16 where the built kernel prefers them
    (:func:`native.preferred_lanes`: AVX-512, where a 16-float vector costs what an 8-float one does, and AVX2, which
    runs 4 rows x 16 lanes with fewer loads per FMA), and windows are then 16 outputs wide; small groups still share
    8-lane tasks.
    """
    lanes = native.preferred_lanes()
    weight = weight.detach().reshape(weight.shape[0], -1).cpu().float()
    bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach().cpu().float()
    in_groups, out_groups = in_groups.cpu(), out_groups.cpu()
    runs = {g: _runs(torch.nonzero(in_groups == g).flatten().tolist()) for g in range(num_groups)}
    bins: list[list[tuple[list[int], list[tuple[int, int]]]]] = []  # per task: (filters of one group, runs)
    if windows:
        for first in range(0, len(out_groups), lanes):
            window = list(range(first, min(first + lanes, len(out_groups))))
            members: dict[int, list[int]] = {}
            for f in window:
                members.setdefault(int(out_groups[f]), []).append(f)
            bins.append([(filters, runs[g]) for g, filters in members.items()])
    else:
        chunks = []  # (filters, input runs): up to `lanes` filters of one group
        for g in range(num_groups):
            filters = torch.nonzero(out_groups == g).flatten().tolist()
            chunks += [(filters[i:i + lanes], runs[g]) for i in range(0, len(filters), lanes)]
        for chunk in chunks:  # consecutive chunks share a task while their filters fit in 8 lanes (a wide task
            # of small groups would read all their inputs for twice the lanes: no fewer instructions)
            if bins and sum(len(f) for f, _ in bins[-1]) + len(chunk[0]) <= LANES:
                bins[-1].append(chunk)
            else:
                bins.append([chunk])
    tasks, segments, out_index, weights, biases = [], [], [], [], []
    w_offset = bias_offset = 0
    for members in bins:
        filters = [f for chunk_filters, _ in members for f in chunk_filters]
        width = LANES if len(filters) <= LANES else WIDE_LANES
        consecutive = len(filters) == width and filters == list(range(filters[0], filters[0] + width))
        tasks.append([len(segments), sum(len(runs) for _, runs in members), bias_offset, len(filters),
                      len(out_index), CONSECUTIVE * consecutive | WIDE * (width == WIDE_LANES)])
        out_index.extend(filters)
        lane_bias = torch.zeros(width)
        lane_bias[:len(filters)] = bias[filters]
        biases.append(lane_bias)
        bias_offset += width
        lane = 0
        for chunk_filters, runs in members:
            for first, length in runs:
                block = torch.zeros(length, width)
                block[:, lane:lane + len(chunk_filters)] = weight[chunk_filters][:, first:first + length].t()
                segments.append([first, length, w_offset])
                weights.append(block.flatten())
                w_offset += block.numel()
            lane += len(chunk_filters)
    long = dict(dtype=torch.long)
    return {  # rows of "tasks" / "segments" are the C source's T_* / S_* fields; the C side only reads
        # what tasks point to, so empty tables are fine
        "weight": torch.cat(weights) if weights else torch.zeros(0),
        "bias": torch.cat(biases) if biases else torch.zeros(0),
        "tasks": torch.tensor(tasks, **long).reshape(-1, TASK_FIELDS),
        "segments": torch.tensor(segments, **long).reshape(-1, SEGMENT_FIELDS),
        "out_index": torch.tensor(out_index, **long),
    }



class TableError(ValueError):
    """Kernel tables (or a call's tensors) that would make the C code read or write outside its arrays."""


class TableLimits(NamedTuple):
    reads: int  # input channels the tables read: the highest + 1
    writes: int  # output channels they write: the highest + 1


TABLE_KINDS = {"weight": (torch.float32, 1), "bias": (torch.float32, 1), "tasks": (torch.int64, 2),
               "segments": (torch.int64, 2), "out_index": (torch.int64, 1)}
TABLE_VALUE_LIMIT = 1 << 40  # no table entry is larger: sums and products of entries cannot overflow int64


def _covered(starts: Tensor, counts: Tensor, size: int) -> Tensor:
    """Which of ``size`` rows lie in some ``[start, start + count)`` range (a difference array, O(rows + ranges))."""
    marks = torch.zeros(size + 1, dtype=torch.long)
    marks.index_add_(0, starts, torch.ones_like(starts))
    marks.index_add_(0, starts + counts, -torch.ones_like(starts))
    return marks.cumsum(0)[:size] > 0


def validate_tables(tables: dict[str, Tensor]) -> TableLimits:
    """Check everything the C code indexes with :func:`pack`'s tables, and return the channels they read and write
    (the caller compares those with its input and output). Raises :class:`TableError`.

    What the C code trusts (``unequal_group_conv.c``: ``block8``, ``block1`` and their wide forms): each task row
    ``[first segment, segment count, bias offset, filter count, offset in out_index, flags]`` has its segments
    inside ``segments``, a bias vector of its width (8, or 16 with ``T_WIDE``) inside ``bias``, at most that many
    filters, all inside ``out_index``, and with ``T_CONSECUTIVE`` exactly that many whose channels start at
    ``out_index[offset]``; each segment ``[first input channel, length, weight offset]`` of a task reads inputs
    ``first .. first + length`` and ``length`` weight vectors of the task's width from ``weight[offset]``.
    Vectorised (no Python loop over tasks): a few hundred microseconds for a whole network's tables, once
    per step (:func:`checked_step`)."""
    for name, (dtype, dim) in TABLE_KINDS.items():
        t = tables.get(name)
        if not isinstance(t, Tensor):
            raise TableError(f"kernel tables: {name} missing")
        if t.dtype != dtype or t.dim() != dim or not t.is_contiguous() or t.device.type != "cpu":
            raise TableError(f"kernel tables: {name} must be a contiguous {dim}-d {dtype} tensor on the CPU, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device.type}")
    tasks, segments, out_index = tables["tasks"], tables["segments"], tables["out_index"]
    if tasks.shape[1] != TASK_FIELDS or segments.shape[1] != SEGMENT_FIELDS:
        raise TableError(f"kernel tables: tasks / segments must have {TASK_FIELDS} / {SEGMENT_FIELDS} columns, got "
                         f"{tasks.shape[1]} / {segments.shape[1]}")
    for name, t in (("tasks", tasks), ("segments", segments), ("out_index", out_index)):
        if t.numel() and not (int(t.min()) >= 0 and int(t.max()) < TABLE_VALUE_LIMIT):
            raise TableError(f"kernel tables: {name} holds a negative or huge entry")
    n_weight, n_bias, n_out, n_seg = tables["weight"].numel(), tables["bias"].numel(), len(out_index), len(segments)
    first_seg, seg_count, bias_at, filters, out_at, flags = tasks.unbind(1)
    width = torch.where(flags & WIDE != 0, WIDE_LANES, LANES)
    consecutive = flags & CONSECUTIVE != 0
    checks = (
        (flags > (CONSECUTIVE | WIDE), "unknown flags"),
        (first_seg + seg_count > n_seg, f"segments past the end of segments ({n_seg} rows)"),
        (bias_at + width > n_bias, f"a bias vector past the end of bias ({n_bias} floats)"),
        (filters > width, "more filters than vector lanes"),
        (out_at + filters > n_out, f"outputs past the end of out_index ({n_out} entries)"),
        (consecutive & (filters != width), "consecutive outputs in a task that is not full"),
    )
    for bad, what in checks:
        if bad.any():
            row = int(torch.nonzero(bad)[0])
            raise TableError(f"kernel tables: task {row} {tasks[row].tolist()} points outside the tables: {what}")
    writes = int(out_index.max()) + 1 if n_out else 0
    if consecutive.any():  # one vector store of `width` channels from out_index[offset]
        writes = max(writes, int((out_index[out_at[consecutive]] + width[consecutive]).max()))
    used = _covered(first_seg, seg_count, n_seg)  # segments no task points to are never read
    if not used.any():
        return TableLimits(0, writes)
    wide = flags & WIDE != 0
    seg_width = torch.where(_covered(first_seg[wide], seg_count[wide], n_seg), WIDE_LANES, LANES)
    first, length, weight_at = segments.unbind(1)
    past = used & (weight_at + length * seg_width > n_weight)
    if past.any():
        row = int(torch.nonzero(past)[0])
        raise TableError(f"kernel tables: segment {row} {segments[row].tolist()} points outside the tables: weights "
                         f"past the end of weight ({n_weight} floats)")
    return TableLimits(int((first + length)[used].max()), writes)


CONV1X1, DEPTHWISE, BLOCK = 0, 1, 2  # step kinds: K_CONV1X1, K_DEPTHWISE, K_BLOCK in the C source
TABLES = ("tasks", "segments", "out_index", "weight", "bias")
# ints = HEADER, the expand conv's tasks, segments, out_index, the projection's; floats = the expand conv's weight and
# bias, the depthwise taps (9 x hidden) and bias (hidden), the projection's weight and bias. Counts: rows of tasks and
# segments, entries of the rest; a lone 1x1 conv (CONV1X1) or a block without expand conv (DEPTHWISE) has no e_*.
HEADER = ("kind", "stride", "relu6", "in_channels", "hidden", "out_channels", *("e_" + t for t in TABLES), *TABLES)
EMPTY = {"tasks": torch.zeros(0, TASK_FIELDS, dtype=torch.long), "segments": torch.zeros(0, SEGMENT_FIELDS, dtype=torch.long),
         "out_index": torch.zeros(0, dtype=torch.long), "weight": torch.zeros(0), "bias": torch.zeros(0)}


def make_step(projection: dict[str, Tensor], in_channels: int, out_channels: int, relu6: bool = False,
              expand: dict[str, Tensor] | None = None, dw_taps: Tensor | None = None, dw_bias: Tensor | None = None,
              stride: int = 1) -> tuple[Tensor, Tensor]:
    """``(ints, floats)`` of one step: ``act(projection(h) [+ residual])`` where ``h`` is the input (``in_channels``),
    or ``relu6(depthwise3x3(.) + dw_bias)`` of it (``dw_taps``: 9 x hidden, :func:`depthwise_taps`), of
    ``relu6(expand(x))`` with ``expand``'s tables (one group for a dense conv)."""
    e = EMPTY if expand is None else expand
    hidden = 0 if dw_taps is None else dw_taps.shape[1]
    kind = BLOCK if expand is not None else DEPTHWISE if dw_taps is not None else CONV1X1
    counts = [len(t[name]) if name in ("tasks", "segments") else t[name].numel() for t in (e, projection)
              for name in TABLES]
    header = torch.tensor([kind, stride, int(relu6), in_channels, hidden, out_channels, *counts])
    ints = torch.cat([header, *(t[name].reshape(-1) for t in (e, projection) for name in TABLES[:3])])
    # a step's tensors live on the CPU whatever device the network is on (its tables are CPU tensors)
    dw = [] if dw_taps is None else [dw_taps.reshape(-1), dw_bias.reshape(-1)]
    floats = torch.cat([e["weight"], e["bias"], *(d.detach().cpu().float() for d in dw), projection["weight"],
                        projection["bias"]])
    return ints.contiguous(), floats.contiguous()


def depthwise_taps(dw_weight: Tensor) -> Tensor:
    """``C x 1 x 3 x 3`` depthwise weight -> ``9 x C`` float32 (one tap's channels contiguous, as the C code reads)."""
    return dw_weight.detach().reshape(dw_weight.shape[0], 9).t().contiguous().float()


def unpack(tables: dict[str, Tensor], in_channels: int) -> tuple[Tensor, Tensor]:
    """The ``C_out x C_in`` block-diagonal weight and the bias that :func:`pack`'s tables apply."""
    out_index, tasks, segments = tables["out_index"], tables["tasks"].tolist(), tables["segments"].tolist()
    weight, bias = torch.zeros(len(out_index), in_channels), torch.zeros(len(out_index))
    for (first_seg, n_seg, b_at, n_filters, o_at, _), lanes in zip(tasks, task_lanes(tables).tolist()):
        filters = out_index[o_at:o_at + n_filters]
        bias[filters] = tables["bias"][b_at:b_at + n_filters]
        for first, length, w_at in segments[first_seg:first_seg + n_seg]:
            block = tables["weight"][w_at:w_at + length * lanes].reshape(length, lanes)
            weight[filters, first:first + length] += block[:, :n_filters].t()  # zero outside the group's lanes
    return weight, bias


def _table_set(tasks: Tensor, segments: Tensor, out_index: Tensor, weight: Tensor, bias: Tensor) -> dict[str, Tensor]:
    """:func:`pack`'s tables from a step's flat views."""
    return {"tasks": tasks.view(-1, TASK_FIELDS), "segments": segments.view(-1, SEGMENT_FIELDS),
            "out_index": out_index, "weight": weight, "bias": bias}


class Step:
    """A checked step (:func:`checked_step`): its header as attributes, its tables as views of ``ints``/``floats``."""

    def __init__(self, ints: Tensor, floats: Tensor) -> None:
        for name, t, dtype in (("ints", ints, torch.int64), ("floats", floats, torch.float32)):
            if not isinstance(t, Tensor) or t.dtype != dtype or t.dim() != 1 or not t.is_contiguous() or t.is_cuda:
                raise TableError(f"fused step: {name} must be a contiguous 1-d {dtype} CPU tensor, got "
                                 f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        # private copies: everything below, and every record's pointers, refer to them only, so no later edit of the
        # caller's tensors (in place without a version count, through an alias, resize_) reaches the C code unchecked
        ints, floats = ints.detach().clone(), floats.detach().clone()
        if len(ints) < len(HEADER):
            raise TableError(f"fused step: {len(ints)} ints, the header alone has {len(HEADER)}")
        head = dict(zip(HEADER, ints[:len(HEADER)].tolist()))
        if not all(0 <= v < TABLE_VALUE_LIMIT for v in head.values()):
            raise TableError("fused step: a negative or huge header entry")
        self.ints, self.floats, self.header = ints, floats, head
        self.kind, self.stride, self.relu6 = head["kind"], head["stride"], bool(head["relu6"])
        self.in_channels, self.hidden, self.out_channels = head["in_channels"], head["hidden"], head["out_channels"]
        expand_counts = [head["e_" + t] for t in TABLES]
        if (self.kind not in (CONV1X1, DEPTHWISE, BLOCK) or head["relu6"] > 1 or self.stride not in (1, 2)
                or (self.kind == CONV1X1 and (self.stride != 1 or self.hidden))
                or (self.kind == DEPTHWISE and self.hidden != self.in_channels)
                or (self.kind != BLOCK and any(expand_counts)) or min(self.in_channels, self.out_channels) < 1
                or (self.kind != CONV1X1 and self.hidden < 1)):
            raise TableError(f"fused step: inconsistent header {head}")
        widths = {"tasks": TASK_FIELDS, "segments": SEGMENT_FIELDS, "out_index": 1}
        n_ints = len(HEADER) + sum(head[p + t] * w for p in ("e_", "") for t, w in widths.items())
        n_floats = sum(head[p + t] for p in ("e_", "") for t in ("weight", "bias")) + 10 * self.hidden
        if (len(ints), len(floats)) != (n_ints, n_floats):
            raise TableError(f"fused step: {len(ints)} ints / {len(floats)} floats, its header gives {n_ints} / "
                             f"{n_floats}")
        # the layout of make_step: ints = header, e_tasks, e_segments, e_out_index, tasks, segments, out_index;
        # floats = e_weight, e_bias, depthwise taps (9 x hidden) and bias (hidden), weight, bias
        sizes = [head[p + t] * widths[t] for p in ("e_", "") for t in TABLES[:3]]
        e_tasks, e_segments, e_out, p_tasks, p_segments, p_out = ints[len(HEADER):].split(sizes)
        floats_sizes = [head["e_weight"], head["e_bias"], 9 * self.hidden, self.hidden, head["weight"], head["bias"]]
        e_weight, e_bias, taps, dw_bias, p_weight, p_bias = floats.split(floats_sizes)
        self.dw_taps, self.dw_bias = (taps.view(9, self.hidden), dw_bias) if self.hidden else (None, None)
        self.expand = _table_set(e_tasks, e_segments, e_out, e_weight, e_bias) if self.kind == BLOCK else None
        self.projection = _table_set(p_tasks, p_segments, p_out, p_weight, p_bias)
        if self.expand is not None:
            check_tables(self.expand, self.in_channels, self.hidden, "fused step: expand conv tables")
        check_tables(self.projection, self.hidden or self.in_channels, self.out_channels, "fused step: tables")
        self._records: dict[tuple, Tensor] = {}
        self._dense: dict[str, tuple[Tensor, Tensor]] = {}

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return (h - 1) // self.stride + 1, (w - 1) // self.stride + 1

    def check_call(self, x: Tensor, residual: Tensor | None) -> Tensor | None:
        """Raise :class:`TableError` unless ``x`` (N, C, H, W) and ``residual`` fit this step; the residual, channels_last."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise TableError(f"fused step: the input must be a 4-d tensor of {self.in_channels} channels, got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if residual is None:
            return None
        shape = (x.shape[0], self.out_channels, *self.output_size(x.shape[2], x.shape[3]))
        if residual.shape != shape or residual.dtype != x.dtype or residual.device != x.device:
            raise TableError(f"fused step: the residual must be a {x.dtype} tensor of shape {shape}, got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        return residual.contiguous(memory_format=torch.channels_last)

    def record(self, x_slot: int, out_slot: int, residual_slot: int, h: int, w: int) -> Tensor:
        """The C ``run_chain`` record (``P_*`` fields, one int64 row) of this step on an ``h x w`` input; buffers by
        slot. Built once per input size."""
        key = (x_slot, out_slot, residual_slot, h, w)
        if key not in self._records:
            if len(self._records) >= 16:  # a few input sizes are the rule; many, a waste of memory
                self._records.clear()
            e, p = self.expand or EMPTY, self.projection
            e_ptrs = [0] * 6 if self.expand is None else [e["weight"].data_ptr(), e["bias"].data_ptr(),
                                                          e["tasks"].data_ptr(), len(e["tasks"]),
                                                          e["segments"].data_ptr(), e["out_index"].data_ptr()]
            dw = [0, 0] if self.dw_taps is None else [self.dw_taps.data_ptr(), self.dw_bias.data_ptr()]
            self._records[key] = torch.tensor([[
                self.kind, x_slot, residual_slot, out_slot, self.in_channels, h, w, self.stride,
                *self.output_size(h, w), int(self.relu6), self.out_channels, self.hidden, *e_ptrs, *dw,
                p["weight"].data_ptr(), p["bias"].data_ptr(), p["tasks"].data_ptr(), len(p["tasks"]),
                p["segments"].data_ptr(), p["out_index"].data_ptr()]])
        return self._records[key]

    def dense(self, which: str) -> tuple[Tensor, Tensor]:
        """``(weight, bias)`` of the expand conv or the projection as a block-diagonal dense 1x1 conv (built once)."""
        if which not in self._dense:
            tables, channels = ((self.expand, self.in_channels) if which == "expand" else
                                (self.projection, self.hidden or self.in_channels))
            self._dense[which] = unpack(tables, channels)
        return self._dense[which]

    def reference(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The step with stock ops (any device, float dtype); channels_last output."""
        cast = dict(device=x.device, dtype=x.dtype)
        if self.kind == BLOCK:
            weight, bias = self.dense("expand")
            x = F.conv2d(x, weight.to(**cast)[:, :, None, None], bias.to(**cast)).clamp(0.0, 6.0)
        if self.kind != CONV1X1:
            taps = self.dw_taps.t().reshape(self.hidden, 1, 3, 3).to(**cast)
            x = F.conv2d(x, taps, self.dw_bias.to(**cast), self.stride, 1, 1, self.hidden).clamp(0.0, 6.0)
        weight, bias = self.dense("projection")
        y = F.conv2d(x, weight.to(**cast)[:, :, None, None], bias.to(**cast))
        if residual is not None:
            y = y + residual
        if self.relu6:
            y = y.clamp(0.0, 6.0)
        return y.contiguous(memory_format=torch.channels_last)


def _versions(ts: tuple[Tensor, ...]) -> tuple[int, ...]:
    """How often each tensor was changed in place (-1: an inference tensor, which keeps no count and can be changed
    only inside inference mode)."""
    return tuple(-1 if t.is_inference() else t._version for t in ts)


_checked: dict[tuple[int, int], tuple] = {}  # (id(ints), id(floats)) -> (weak references, versions, step)


def checked_step(ints: Tensor, floats: Tensor) -> Step:
    """The :class:`Step` of ``(ints, floats)``, checked once per pair of tensors: a call with the tensors of an earlier
    call, unchanged since, costs a dict lookup (about a microsecond). Entries are keyed by the tensors themselves (weak
    references: a new tensor at a freed one's address or id is checked anew) and hold their version counters (an
    in-place change, ``resize_`` and ``set_`` included, is checked anew). Raises :class:`TableError`."""
    key = (id(ints), id(floats))
    entry = _checked.get(key)
    if entry is not None:
        (ri, rf), versions, step = entry
        if ri() is ints and rf() is floats and (versions[0] < 0 or (ints._version, floats._version) == versions):
            return step
    step = Step(ints, floats)
    forget = lambda _, key=key, cache=_checked: cache.pop(key, None)  # noqa: E731  (module globals are gone at exit)
    versions = _versions((ints, floats))
    _checked[key] = ((weakref.ref(ints, forget), weakref.ref(floats, forget)),
                     (-1, -1) if min(versions) < 0 else versions, step)
    return step


def check_tables(tables: dict[str, Tensor], in_channels: int, out_channels: int, what: str) -> TableLimits:
    """:func:`validate_tables`, and the tables read at most ``in_channels`` inputs and write every one of
    ``out_channels`` outputs and no other (an output they skipped would hand out whatever memory held before)."""
    limits = validate_tables(tables)
    if limits.reads > in_channels:
        raise TableError(f"{what}: read {limits.reads} input channels, the input has {in_channels}")
    if limits.writes > out_channels:
        raise TableError(f"{what}: write output channel {limits.writes - 1}, the output has {out_channels}")
    tasks, out_index = tables["tasks"], tables["out_index"]
    written = torch.zeros(out_channels, dtype=torch.bool)
    if len(tasks):
        _, _, _, filters, out_at, flags = tasks.unbind(1)
        consecutive = flags & CONSECUTIVE != 0
        entries = _covered(out_at[~consecutive], filters[~consecutive], len(out_index))  # out_index entries read
        written[out_index[entries]] = True
        width = torch.where(flags[consecutive] & WIDE != 0, WIDE_LANES, LANES)
        written |= _covered(out_index[out_at[consecutive]], width, out_channels)
    if not written.all():
        raise TableError(f"{what}: output channel {int(torch.nonzero(~written)[0])} of {out_channels} is never written")
    return limits
