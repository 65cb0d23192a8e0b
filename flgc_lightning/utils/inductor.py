"""``torch.compile`` on the CPU: inductor's on-disk cache keyed by the vector width it generates code for.

Inductor's FX graph cache (torch 2.14) keys a compiled graph by the graph and inductor's settings, but not by the
vector instruction set its C++ kernels were generated for, and it builds a cached entry's kernels again with the
flags of the process that loads it. Processes that pick different sets and share a cache folder
(``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine, as our AVX2 benchmarks run; AVX2 and AVX-512 nodes sharing
``TORCHINDUCTOR_CACHE_DIR``) then run code tiled for the other width: loops that step by 8 floats and store 16 write
past their buffers (heap corruption, ``free(): invalid pointer``), loops that step by 16 and store 8 leave outputs
unwritten (wrong results). Seen on an AMD EPYC Zen 4 with MobileNetV2's ReLU6 + pooling kernel; reproduced in
tests/test_deploy_export.py. Naming the width in inductor's settings (``cpp.simdlen``, the width it would pick
anyway) puts it in the cache key.
"""
from __future__ import annotations


def pin_cpu_vector_width() -> int | None:
    """Set inductor's ``cpp.simdlen`` to the vector width (bits) it generates CPU code for in this process, unless it
    is set already; returns the setting (``None``: no vector code here)."""
    from torch._inductor import config, cpu_vec_isa

    if config.cpp.simdlen is None:
        isa = cpu_vec_isa.pick_vec_isa()
        if isa:
            config.cpp.simdlen = isa.bit_width()
    return config.cpp.simdlen
