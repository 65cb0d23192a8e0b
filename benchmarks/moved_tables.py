"""A deployed file moved between CPU kinds: kernel tables packed for 16 lanes (what AVX-512 and AVX2 machines write
into a ``.pt2`` or ONNX file) against tables packed for 8 lanes (what a build without AVX writes, and AVX2 builds
before 2026-12-07), run by the kernel built for each instruction set this CPU runs.

    python benchmarks/moved_tables.py [--groups 8] [--threads 2] [--batches 1 64] [--repeats 15]

Each instruction set runs in its own child process (``ATEN_CPU_CAPABILITY`` picks the kernel build, as on a machine
of that kind); in it the reference FLGC network (N(0,1) assignments) is deployed and exported to a ``.pt2`` program twice, once
per table width, and the two programs are timed interleaved, median of ``--repeats`` rounds. Target: on a build without AVX-512, 16-lane
tables run within 1.25x of 8-lane tables (a moved file loses at most a quarter; before the fix in
``unequal_group_conv.c``'s ``block8_wide``, 6.7x slower at batch 64 with AVX2; with ``block4_wide`` the AVX2 build
runs 16-lane tables faster than 8-lane ones). Exit status 1 on a FAIL.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import like_trained, time_interleaved  # noqa: E402

from flgc_lightning.deploy import deploy_model, export_program, load_program, native  # noqa: E402
from flgc_lightning.models import MobileNetV2  # noqa: E402

CAPABILITY = {"avx512": "avx512", "avx2": "avx2", "baseline": "default"}  # ATEN_CPU_CAPABILITY of each build
BOUND = 1.25


def worker(args) -> dict:
    """``{batch: {lanes: seconds}}`` in this process's kernel build."""
    torch.set_num_threads(args.threads)
    flgc = like_trained(MobileNetV2(groups=args.groups, use_flgc=True), 0).eval()
    built, nets = native.preferred_lanes, {}
    with tempfile.TemporaryDirectory() as folder:
        for lanes in (8, 16):  # a deployed network packs its tables as this machine's kernel prefers, on every call:
            # a .pt2 program keeps the tables it was exported with, as on the machine that wrote it
            native.preferred_lanes = lambda lanes=lanes: lanes
            try:
                export_program(deploy_model(flgc, kernel="fused"), Path(folder) / f"{lanes}.pt2")
            finally:
                native.preferred_lanes = built
            nets[lanes] = load_program(Path(folder) / f"{lanes}.pt2")
    result = {"isa": native.instruction_set(), "flags": native.load_library().flags, "times": {}}
    with torch.inference_mode():
        for batch in args.batches:
            x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            result["times"][batch] = time_interleaved({lanes: (lambda n=n: n(x)) for lanes, n in nets.items()},
                                                      args.repeats)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if not native.available():
        print("error: the fused kernel cannot be built here (no C compiler)", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {args.threads} thread(s), reference FLGC G={args.groups}, .pt2 programs, median of "
          f"{args.repeats} interleaved rounds; this CPU runs {', '.join(native.instruction_sets_here())}")
    print("| build | batch | 8-lane tables (ms) | 16-lane tables (ms) | 16 / 8 | target |")
    print("|---|---|---|---|---|---|")
    failed = False
    for isa in native.instruction_sets_here():
        env = {**os.environ, "ATEN_CPU_CAPABILITY": CAPABILITY[isa]}
        env.pop("FLGC_NATIVE_FLAGS", None)
        done = subprocess.run([sys.executable, __file__, "--worker", "--groups", str(args.groups), "--threads",
                               str(args.threads), "--repeats", str(args.repeats), "--batches", *map(str, args.batches)],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"error: the {isa} worker failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["isa"] == isa, (result["isa"], isa)
        for batch, times in result["times"].items():
            ratio = times["16"] / times["8"]
            verdict = "-" if isa == "avx512" else f"<= {BOUND} {'PASS' if ratio <= BOUND else 'FAIL'}"
            failed |= isa != "avx512" and ratio > BOUND
            print(f"| {isa} ({' '.join(result['flags'][1:])}) | {batch} | {1e3 * times['8']:.2f} | "
                  f"{1e3 * times['16']:.2f} | {ratio:.2f} | {verdict} |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
