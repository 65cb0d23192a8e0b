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
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("unequal_group_conv.c")
LANES, WIDE_LANES = 8, 16  # filters per task: one 8-float vector, or 16 in a wide task (matches the C source)
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
        lib.preferred_lanes.argtypes, lib.preferred_lanes.restype = [], ctypes.c_int
        p, i64 = ctypes.c_void_p, ctypes.c_int64
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
    """Widest task the built kernel runs best: 16 with AVX-512 or AVX2, else 8 (also without a compiler)."""
    return load_library().preferred_lanes() if available() else LANES


STEP_FIELDS = 27  # P_LEN in the C source


def run_chain(records: Tensor, buffers: list[int], n: int, threads: int | None = None) -> None:
    """Run checked steps' records (rows of :meth:`tables.Step.record`, ``STEP_FIELDS`` int64 each) in one C call on
    ``n`` images; ``buffers``: data pointers of the channels_last tensors the records name by slot."""
    status = load_library().run_chain(records.data_ptr(), len(records), (ctypes.c_int64 * len(buffers))(*buffers), n,
                                      threads or torch.get_num_threads())
    if status != 0:
        raise MemoryError("the fused kernel could not allocate its per-thread buffers")


def run(step, x: Tensor, residual: Tensor | None = None) -> Tensor:
    """One checked step (:func:`tables.checked_step`) on a CPU float32 N, C, H, W tensor; channels_last result.
    ``residual``: :meth:`~tables.Step.check_call`'s, already checked against the output's shape."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise TypeError(f"the fused kernel takes CPU float32 inputs, got {x.dtype} on {x.device.type}")
    x = x.contiguous(memory_format=torch.channels_last)
    n, _, h, w = x.shape
    y = torch.empty(n, step.out_channels, *step.output_size(h, w), memory_format=torch.channels_last)
    if y.numel() == 0:
        return y
    pointers = [x.data_ptr(), y.data_ptr()] + ([] if residual is None else [residual.data_ptr()])
    run_chain(step.record(0, 1, -1 if residual is None else 2, h, w), pointers, n)
    return y
