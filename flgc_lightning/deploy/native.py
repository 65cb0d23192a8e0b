"""The fused CPU kernel for unequal-group 1x1 convolutions (``unequal_group_conv.c``), via ctypes.

No library runs groups of unequal size: oneDNN, MKL and ONNX Runtime only have equal groups, so
padding them costs extra MACs and a channel gather (benchmarks/README.md). The kernel reads each
input row (one pixel, channels_last) once, computes every group's small matrix product in
registers and writes each filter straight to its output channel.

It is plain C (no Python or torch headers), compiled once per machine with the system C compiler (``$CC`` or
``cc``) into a cache folder, before any timing: deploying with ``kernel="fused"``/``"auto"``, opening an ONNX
Runtime session, or explicitly with ``python -m flgc_lightning.deploy --build-kernel`` (builds, says what it built).
No ``-march=native``: the instruction set is chosen at run time from this CPU's features as torch detects
them (``avx512``, ``avx2`` or ``baseline``, :func:`instruction_set`) and named in explicit flags, so a built
library is keyed by source, compiler and flags only and moves between machines of one kind, and a shared cache
on a mixed cluster holds one library per instruction set. OpenMP (``-fopenmp``) is asked for; a compiler without it (Apple clang) gives a
one-thread library and a warning that says so. ``$FLGC_NATIVE_CACHE`` overrides the folder,
``$FLGC_NATIVE_FLAGS`` the flags (one set, no fallback: the tests build with AddressSanitizer this way). OpenMP
comes from the ``libgomp`` torch already loaded, so both share one thread pool.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("unequal_group_conv.c")
LANES, WIDE_LANES = 8, 16  # filters per task: one 8-float vector, or 16 in a wide task (matches the C source)
TASK_FIELDS, SEGMENT_FIELDS = 6, 3  # T_LEN, S_LEN in the C source
CONSECUTIVE, WIDE = 1, 2  # task flags (T_FLAGS): outputs are consecutive channels; 16 lanes
# Instruction sets the C source has code paths for (``__AVX512F__``, ``__AVX__``/AVX2 with FMA, else generic vector
# code), widest first, with the flags that name them: the subsets torch's own AVX-512 / AVX2 kernels need.
INSTRUCTION_SETS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "baseline": [],
}


class NativeKernelUnavailable(RuntimeError):
    """The fused kernel cannot be built here (no C compiler, or it failed)."""


def instruction_set() -> str:
    """The widest of :data:`INSTRUCTION_SETS` this CPU runs, as torch detects it for its own kernels
    (``torch.backends.cpu.get_cpu_capability()``: CPU features the operating system has enabled; ``AVX512`` means
    F, BW, DQ and VL with FMA). ``ATEN_CPU_CAPABILITY=avx2`` (or ``default``) lowers it, for torch and this kernel
    alike. ``baseline`` elsewhere (ARM: NEON is in the baseline)."""
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "baseline")


def instruction_sets_here() -> list[str]:
    """Every instruction set this CPU runs, widest first (the tests build and check each)."""
    names = list(INSTRUCTION_SETS)
    return names[names.index(instruction_set()):]


def flag_sets(isa: str | None = None) -> list[list[str]]:
    """Flag sets to try in order: this CPU's instruction set (``isa`` if given) with OpenMP, then narrower ones
    (an old compiler without some AVX-512 flag), then the same without OpenMP; or the one set in
    ``$FLGC_NATIVE_FLAGS`` (e.g. a build with AddressSanitizer for tests)."""
    chosen = os.environ.get("FLGC_NATIVE_FLAGS", "").split()
    if chosen and isa is None:
        return [chosen]
    names = list(INSTRUCTION_SETS)
    levels = names[names.index(isa or instruction_set()):]
    return [["-O3", *INSTRUCTION_SETS[name], *omp] for omp in (["-fopenmp"], []) for name in levels]


def cache_dir() -> Path:
    if os.environ.get("FLGC_NATIVE_CACHE"):
        return Path(os.environ["FLGC_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flgc_lightning" / "native"


def _private(folder: Path) -> bool:
    """Ours and writable by nobody else: a library loaded from here cannot have been planted."""
    st = folder.stat()
    return not hasattr(os, "getuid") or (st.st_uid == os.getuid() and not st.st_mode & 0o022)


def _writable_cache_dir() -> Path:
    """:func:`cache_dir`, or a private per-user temp folder when that cannot be created (read-only home)."""
    user = getattr(os, "getuid", lambda: "user")()
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"flgc_lightning-native-{user}"):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if os.access(folder, os.W_OK) and _private(folder):
                return folder
        except OSError:
            continue
    raise NativeKernelUnavailable(f"no private writable folder for the compiled kernel ({cache_dir()} or the "
                                  "temp folder)")


def _compile(compiler: str, flags: list[str], target: Path) -> str | None:
    """Build ``target``; ``None`` on success, else the compiler's message."""
    try:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as err:
        return str(err)
    try:
        done = subprocess.run([compiler, *flags, "-fPIC", "-shared", str(SOURCE), "-o", tmp],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return done.stderr.strip() or f"exit code {done.returncode}"
        os.replace(tmp, target)  # atomic: concurrent processes never load a half-written library
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_library: ctypes.CDLL | None = None
_failure: str | None = None


def load_library() -> ctypes.CDLL:
    """The compiled kernel (built once per machine); raises :class:`NativeKernelUnavailable`.

    Success and failure are both remembered for the process: a machine without a compiler tries once.
    """
    global _library, _failure
    if _library is None and _failure is None:
        try:
            _library = _build_and_load()
        except NativeKernelUnavailable as err:
            _failure = str(err)
    if _failure is not None:
        raise NativeKernelUnavailable(_failure)
    return _library


def _build_and_load(isa: str | None = None) -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise NativeKernelUnavailable("no C compiler found (set $CC or install gcc/clang)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise NativeKernelUnavailable(f"C compiler {compiler} does not run: {err}") from None
    try:
        source = SOURCE.read_text()
    except OSError as err:
        raise NativeKernelUnavailable(f"kernel source missing from the installation: {err}") from None
    folder = _writable_cache_dir()
    errors = []
    for flags in flag_sets(isa):
        key = hashlib.sha256("\0".join([source, compiler, version, *flags]).encode())
        target = folder / f"unequal_group_conv-{key.hexdigest()[:16]}.so"
        message = None if target.exists() else _compile(compiler, flags, target)
        if message is None:
            try:
                lib = ctypes.CDLL(str(target))
            except OSError:  # e.g. a damaged cached file: build it again once
                message = _compile(compiler, flags, target)
                try:
                    lib = ctypes.CDLL(str(target)) if message is None else None
                except OSError as err:
                    message = f"built but cannot be loaded: {err}"
        if message is not None:
            errors.append(f"{' '.join(flags)}: {message.splitlines()[-1] if message else ''}")
            continue
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.unequal_group_conv1x1.argtypes = [p, i64, i64, p, i64, p, i64, ctypes.c_int, p, p, p, i64, p, p,
                                              ctypes.c_int]
        lib.unequal_group_conv1x1.restype = None
        lib.depthwise_unequal_group_conv.argtypes = [p, i64, i64, i64, i64, p, p, i64, i64, i64, p, i64, p, i64,
                                                     ctypes.c_int, p, p, p, i64, p, p, ctypes.c_int]
        lib.depthwise_unequal_group_conv.restype = ctypes.c_int
        lib.inverted_residual_unequal_group.argtypes = [p, i64, i64, i64, i64, p, p, p, i64, p, p, i64, p, p, i64, i64,
                                                        i64, p, i64, p, i64, ctypes.c_int, p, p, p, i64, p, p,
                                                        ctypes.c_int]
        lib.inverted_residual_unequal_group.restype = ctypes.c_int
        lib.preferred_lanes.argtypes, lib.preferred_lanes.restype = [], ctypes.c_int
        lib.run_chain.argtypes, lib.run_chain.restype = [p, i64, p, i64, ctypes.c_int], ctypes.c_int
        lib.flags, lib.path = flags, target
        lib.openmp = "-fopenmp" in flags
        if not lib.openmp and not os.environ.get("FLGC_NATIVE_FLAGS"):
            warnings.warn(f"{compiler} cannot build with OpenMP (-fopenmp): the fused kernel runs on one thread. "
                          "Install a compiler with OpenMP (gcc, or LLVM clang with libomp) and set $CC.",
                          stacklevel=3)
        return lib
    raise NativeKernelUnavailable(f"compiling {SOURCE.name} with {compiler} failed: " + "; ".join(errors))


def build(isa: str) -> ctypes.CDLL:
    """The kernel built for instruction set ``isa`` (not the process's library: for tests and comparisons)."""
    if isa not in INSTRUCTION_SETS:
        raise ValueError(f"isa must be one of {', '.join(INSTRUCTION_SETS)}, got {isa!r}")
    return _build_and_load(isa)


def describe(lib: ctypes.CDLL) -> str:
    """One line on a built library: flags, OpenMP, task width."""
    return (f"built with {' '.join(lib.flags)}; OpenMP {'on' if lib.openmp else 'off (one thread)'}; "
            f"{lib.preferred_lanes()}-lane tasks preferred")


def available() -> bool:
    try:
        load_library()
        return True
    except NativeKernelUnavailable:
        return False


def preferred_lanes() -> int:
    """Widest task the built kernel runs best: 16 with AVX-512, else 8 (also without a compiler)."""
    return load_library().preferred_lanes() if available() else LANES


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
         num_groups: int, windows: bool = False, lanes: int | None = None) -> dict[str, Tensor]:
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

    ``lanes`` (default :func:`preferred_lanes`): 16 lets a group of more than 8 filters take wide tasks of up to
    16 (one 16-float vector: on AVX-512 it costs what an 8-float one does, so such groups, a dense conv above all,
    take half the multiply-add instructions), and windows of 16 outputs; small groups still share 8-lane tasks.
    """
    lanes = preferred_lanes() if lanes is None else lanes
    if lanes not in (LANES, WIDE_LANES):
        raise ValueError(f"lanes must be {LANES} or {WIDE_LANES}, got {lanes}")
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


def unequal_group_conv1x1(x: Tensor, tables: dict[str, Tensor], out_channels: int, residual: Tensor | None = None,
                          relu6: bool = False) -> Tensor:
    """Run the kernel on a CPU float32 NCHW-shaped tensor; the result is channels_last.

    ``residual`` (same shape as the result) is added in the same pass, then ReLU6 if ``relu6``.
    """
    lib = load_library()
    _check_input(x)
    check_tables(tables, x.shape[1], out_channels)
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    y = torch.empty(n, out_channels, h, w, memory_format=torch.channels_last)
    residual = _checked_residual(residual, y)
    lib.unequal_group_conv1x1(
        x.data_ptr(), n * h * w, c, y.data_ptr(), out_channels,
        None if residual is None else residual.data_ptr(), out_channels, int(relu6),
        tables["weight"].data_ptr(), tables["bias"].data_ptr(), tables["tasks"].data_ptr(), len(tables["tasks"]),
        tables["segments"].data_ptr(), tables["out_index"].data_ptr(), torch.get_num_threads(),
    )
    return y


def depthwise_taps(dw_weight: Tensor) -> Tensor:
    """``C x 1 x 3 x 3`` depthwise weight -> ``9 x C`` float32 (one tap's channels contiguous, as the C code reads)."""
    return dw_weight.detach().reshape(dw_weight.shape[0], 9).t().contiguous().float()


def _checked_residual(residual: Tensor | None, y: Tensor) -> Tensor | None:
    if residual is None:
        return None
    if residual.shape != y.shape or residual.dtype != torch.float32 or residual.device.type != "cpu":
        raise TableError(f"residual must be a CPU float32 tensor of shape {tuple(y.shape)}, got "
                         f"{residual.dtype} {tuple(residual.shape)}")
    return residual.contiguous(memory_format=torch.channels_last)


def depthwise_unequal_group_conv(x: Tensor, dw_taps: Tensor, dw_bias: Tensor, stride: int, tables: dict[str, Tensor],
                                 out_channels: int, residual: Tensor | None = None, relu6: bool = False) -> Tensor:
    """``unequal_group_conv1x1(relu6(depthwise3x3(x) + dw_bias))`` in one pass (padding 1, ``stride`` 1 or 2):
    the depthwise outputs of 8 pixels at a time stay in a per-thread buffer instead of going to memory.
    ``dw_taps``: the depthwise weight as ``9 x C`` (:func:`depthwise_taps`)."""
    lib = load_library()
    _check_input(x)
    taps, bias = dw_taps.contiguous(), dw_bias.contiguous()
    _check_depthwise(taps, bias, x.shape[1], stride)
    check_tables(tables, x.shape[1], out_channels)
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    y = torch.empty(n, out_channels, ho, wo, memory_format=torch.channels_last)
    residual = _checked_residual(residual, y)
    status = lib.depthwise_unequal_group_conv(
        x.data_ptr(), n, h, w, c, taps.data_ptr(), bias.data_ptr(), stride, ho, wo, y.data_ptr(), out_channels,
        None if residual is None else residual.data_ptr(), out_channels, int(relu6),
        tables["weight"].data_ptr(), tables["bias"].data_ptr(), tables["tasks"].data_ptr(), len(tables["tasks"]),
        tables["segments"].data_ptr(), tables["out_index"].data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the fused depthwise kernel could not allocate its per-thread buffers")
    return y


def inverted_residual_unequal_group(x: Tensor, expand_tables: dict[str, Tensor], hidden: int, dw_taps: Tensor,
                                    dw_bias: Tensor, stride: int, tables: dict[str, Tensor], out_channels: int,
                                    residual: Tensor | None = None, relu6: bool = False) -> Tensor:
    """A whole inverted-residual block in one pass per image: ``depthwise_unequal_group_conv`` of
    ``relu6(expand(x))``, where ``expand`` is the 1x1 conv of ``expand_tables`` (:func:`pack`; one group for a
    dense conv) with ``hidden`` outputs. The expanded image stays in a per-thread buffer (L2) and the
    depthwise output in L1: only the block's narrow input and output go through memory."""
    lib = load_library()
    _check_input(x)
    taps, bias = dw_taps.contiguous(), dw_bias.contiguous()
    _check_depthwise(taps, bias, hidden, stride)
    check_tables(expand_tables, x.shape[1], hidden, "expand conv tables")
    check_tables(tables, hidden, out_channels)
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    y = torch.empty(n, out_channels, ho, wo, memory_format=torch.channels_last)
    residual = _checked_residual(residual, y)
    e, t = expand_tables, tables
    status = lib.inverted_residual_unequal_group(
        x.data_ptr(), n, h, w, c, e["weight"].data_ptr(), e["bias"].data_ptr(), e["tasks"].data_ptr(),
        len(e["tasks"]), e["segments"].data_ptr(), e["out_index"].data_ptr(), hidden, taps.data_ptr(),
        bias.data_ptr(), stride, ho, wo, y.data_ptr(), out_channels,
        None if residual is None else residual.data_ptr(), out_channels, int(relu6),
        t["weight"].data_ptr(), t["bias"].data_ptr(), t["tasks"].data_ptr(), len(t["tasks"]),
        t["segments"].data_ptr(), t["out_index"].data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the fused block kernel could not allocate its per-thread buffers")
    return y


STEP_FIELDS = 27  # P_LEN in the C source
STEP_KINDS = {"FlgcConv1x1": 0, "FlgcDepthwiseProjection": 1, "FlgcInvertedResidual": 2}


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
    per table object (:func:`table_limits`)."""
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


def _versions(ts: tuple[Tensor, ...]) -> tuple[int, ...]:
    """How often each tensor was changed in place (-1: an inference tensor, which keeps no count and can be changed
    only inside inference mode)."""
    return tuple(-1 if t.is_inference() else t._version for t in ts)


_checked: dict[tuple[int, ...], tuple] = {}  # ids of a table set -> (weak references, versions, limits)


def table_limits(tables: dict[str, Tensor]) -> TableLimits:
    """:func:`validate_tables`, once per set of table tensors: a call with the tensors of an earlier call, unchanged
    since, costs a dict lookup (about a microsecond). Entries are keyed by the tensors themselves (weak references: a
    new tensor at a freed one's address or id is validated anew) and hold their version counters (an in-place
    change, ``resize_`` and ``set_`` included, is validated anew)."""
    w, b, t, s, o = tables["weight"], tables["bias"], tables["tasks"], tables["segments"], tables["out_index"]
    key = (id(w), id(b), id(t), id(s), id(o))
    entry = _checked.get(key)
    if entry is not None:
        (rw, rb, rt, rs, ro), versions, limits = entry
        if rw() is w and rb() is b and rt() is t and rs() is s and ro() is o and (
                versions[0] < 0 or (w._version, b._version, t._version, s._version, o._version) == versions):
            return limits
    limits = validate_tables(tables)
    forget = lambda _, key=key: _checked.pop(key, None)  # noqa: E731
    ts = (w, b, t, s, o)
    versions = _versions(ts)
    if min(versions) < 0:  # some inference tensors: no counters to compare
        versions = (-1,) * len(ts)
    _checked[key] = (tuple(weakref.ref(x, forget) for x in ts), versions, limits)
    return limits


def check_tables(tables: dict[str, Tensor], in_channels: int | None, out_channels: int | None,
                 what: str = "kernel tables") -> TableLimits:
    """:func:`table_limits`, and the tables read at most ``in_channels`` inputs and write inside ``out_channels``
    outputs (``None``: not known yet). Raises :class:`TableError`."""
    limits = table_limits(tables)
    if in_channels is not None and limits.reads > in_channels:
        raise TableError(f"{what}: read {limits.reads} input channels, the input has {in_channels}")
    if out_channels is not None and limits.writes > out_channels:
        raise TableError(f"{what}: write output channel {limits.writes - 1}, the output has {out_channels}")
    return limits


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
        raise TableError(f"the fused kernels take a 4-d CPU float32 input, got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")


def _check_depthwise(dw_taps: Tensor, dw_bias: Tensor, channels: int, stride: int) -> None:
    """The depthwise weights the C code reads: ``9 x channels`` taps and ``channels`` biases, float32, contiguous."""
    for name, t, shape in (("dw_taps", dw_taps, (9, channels)), ("dw_bias", dw_bias, (channels,))):
        if (not isinstance(t, Tensor) or t.shape != shape or t.dtype != torch.float32 or t.device.type != "cpu"
                or not t.is_contiguous()):
            raise TableError(f"depthwise weights: {name} must be a contiguous CPU float32 tensor of shape {shape}, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if stride not in (1, 2):
        raise TableError(f"depthwise conv: stride must be 1 or 2, got {stride}")


def run_chain(steps: Tensor, buffers: Tensor, n: int, threads: int | None = None) -> None:
    """Run ``steps`` (``STEP_FIELDS`` int64 each: what, which buffers, sizes, table pointers) in one C call;
    ``buffers``: int64 data pointers, the input first and one output per step."""
    status = load_library().run_chain(steps.data_ptr(), len(steps), buffers.data_ptr(), n,
                                      threads or torch.get_num_threads())
    if status != 0:
        raise MemoryError("the fused block kernel could not allocate its per-thread buffers")
