"""Inference latency of dense, standard grouped and FLGC MobileNetV2 in every engine, with the issue-10 targets.

    python benchmarks/inference.py [--variant reference|paper] [--checkpoint FLGC.ckpt] [--groups 8]
                                   [--threads 2] [--batches 1 64] [--repeats 20]

Engines (CPU, float32, ``--threads`` threads): eager PyTorch, compiled PyTorch (``torch.compile``, inductor,
freezing: :func:`flgc_lightning.deploy.compile_deployed`) and ONNX Runtime (the ONNX file the deploy CLI writes,
through :func:`flgc_lightning.deploy.onnxruntime_session`). Every model is deployed the same way (BN folded,
channels_last, inference mode); FLGC is deployed with ``kernel="auto"`` as the CLI does, so eager and compiled
run our fused kernel as the ``torch.ops.flgc`` custom op; ONNX Runtime runs the block-diagonal ONNX export.

Each engine is timed in its own child process (models saved once by this process), so no engine's thread
pool or memory arena slows another; within an engine the models are timed interleaved (one call of each per
round) and the median is reported. ONNX Runtime sessions each own a thread pool whose workers spin for a
while after every call (ONNX Runtime's default, its fastest setting): called right after another session,
a session shares the cores with those spinning threads (dense at batch 1: 11 ms instead of 1.3 ms). So in
ONNX Runtime each round gives every model a settling pause and at least 20 ms of warm-up calls (not timed), then five timed calls. "best dense" is the fastest engine for the dense model in this run.
Exit status 0 only if every target passes (1 on a FAIL).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flgc_lightning.deploy.blocks import DeployedInvertedResidual  # noqa: E402
from flgc_lightning.deploy import (  # noqa: E402
    UnequalGroupConv2d, compile_deployed, deploy_model, deployed_macs, export_onnx, native, onnxruntime_session,
)
from flgc_lightning.models import MobileNetV2  # noqa: E402

ENGINES = ("eager", "compiled", "onnxruntime")
# balanced: learned equal groups (model.assignment=balanced); dense_fused: the dense network with its projections
# run by our fused kernels as one group, i.e. dense blocks through the whole-block kernel. No engine offers that for
# dense; it is timed to tell how much of FLGC's gain comes from the fusion and how much from the groups.
MODELS = ("dense", "grouped", "flgc", "balanced", "dense_fused")
VARIANTS = {"reference": {}, "paper": {"group_expand": True, "group_shortcut": True}}
# (label, variant or None for both, engine of the FLGC side or "best", engine of the dense side or "best",
#  batch, bound)
TARGETS = (
    ("best FLGC / best dense", "reference", "best", "best", 64, 0.90),
    ("best FLGC / best dense", "reference", "best", "best", 1, 0.95),
    ("CLI ONNX file / ONNX Runtime dense", None, "onnxruntime", "onnxruntime", 64, 0.90),
    ("CLI ONNX file / ONNX Runtime dense", None, "onnxruntime", "onnxruntime", 1, 1.00),
    ("best FLGC / best dense (paper variant)", "paper", "best", "best", 64, 0.60),
)


def keep_freed_memory() -> None:
    """glibc: keep freed heap memory instead of returning big tensors' pages to the OS after every call (the
    in-process equivalent of PyTorch's jemalloc/tcmalloc advice), for every engine and model alike."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
        libc.mallopt(-2, 512 << 20)  # M_TOP_PAD
    except (OSError, AttributeError):
        pass


def build_models(args) -> tuple[dict[str, torch.nn.Module], torch.nn.Module, dict[str, torch.nn.Module]]:
    """Deployed dense / grouped / FLGC / balanced FLGC networks, the FLGC network as the CLI writes it to ONNX, and
    the trained FLGC and balanced networks they are checked against."""
    torch.manual_seed(args.seed)
    if args.checkpoint:
        from flgc_lightning.deploy import load_trained_network
        flgc, input_size = load_trained_network(args.checkpoint)
        if tuple(input_size) != (3, 32, 32):
            raise SystemExit(f"error: {args.checkpoint} was trained on {input_size} inputs; the benchmark compares "
                             "CIFAR networks (3 x 32 x 32)")
        from flgc_lightning.layers import Flgc2d
        expand_grouped = any(isinstance(b.conv[0][0], Flgc2d) for b in flgc.features
                             if hasattr(b, "use_residual") and len(b.conv) == 3)
        args.variant, args.groups = ("paper" if expand_grouped else "reference"), flgc.groups
    else:  # assignments as initialised: N(0, 1) logits, i.e. uniformly random unequal groups
        flgc = like_trained(MobileNetV2(groups=args.groups, use_flgc=True, **VARIANTS[args.variant]), args.seed)
    flgc.eval()
    # balanced FLGC: equal groups with learned permutations, deployed like learned FLGC (the grouped row is the
    # same cost as standard grouped convs)
    balanced = like_trained(MobileNetV2(groups=args.groups, use_flgc=True, assignment="balanced",
                                        **VARIANTS[args.variant]), args.seed)
    dense = like_trained(MobileNetV2(), args.seed)
    models = {
        "dense": deploy_model(dense),
        "dense_fused": dense_through_block_kernel(deploy_model(dense)),
        "grouped": deploy_model(MobileNetV2(groups=args.groups, **VARIANTS[args.variant])),
        "flgc": deploy_model(flgc, kernel="auto"),
        "balanced": deploy_model(balanced, kernel="auto"),
    }
    return (models, cli_onnx_network(flgc), {"flgc": flgc, "balanced": balanced, "dense": dense})


def like_trained(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """BN statistics and affine terms as training leaves them (not 0/1) and logits of order 1, so that the 1e-4
    exactness bound means something (a freshly initialised network's logits are about 1e-9); timing is unchanged."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.3)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
        net.eval()
        scale = net(torch.randn(8, 3, 32, 32, generator=gen)).abs().max()
        net.classifier.weight.mul_(5.0 / scale)
        net.classifier.bias.mul_(5.0 / scale)
    return net


def cli_onnx_network(flgc: torch.nn.Module) -> torch.nn.Module:
    """The deployed network the deploy CLI writes to ONNX (``--export-kernel`` default: ``fused`` where the kernel
    builds, else ``blockdiag`` with hidden widths multiples of 16)."""
    from flgc_lightning.deploy.__main__ import default_export_kernel, onnx_network
    return onnx_network(flgc, default_export_kernel(), (3, 32, 32))


def dense_through_block_kernel(net: torch.nn.Module) -> torch.nn.Module:
    """A deployed dense network whose projection convs are one-group unequal-group layers (same weights), so each
    block runs our whole-block kernel like a fused FLGC block does."""
    if not native.available():
        return net
    for block in net.features:
        if isinstance(block, DeployedInvertedResidual) and type(block.projection) is torch.nn.Conv2d:
            conv = block.projection
            c_out, c_in = conv.weight.shape[:2]
            layer = UnequalGroupConv2d(conv.weight[:, :, 0, 0], conv.bias, torch.zeros(c_in, dtype=torch.long),
                                       torch.zeros(c_out, dtype=torch.long), 1, "fused")
            block.conv[-1][0] = layer.to(memory_format=torch.channels_last)
            block.prepare()
    return net


def time_interleaved(runners: dict, repeats: int, warmup: int = 3, timer: str = "wall", settle: float = 0.0,
                     calls: int = 1) -> dict[str, float]:
    """Seconds per call of each runner, rounds interleaved across runners: the median wall-clock time, or with
    ``timer="cpu"`` the least CPU time of the calling thread (single-threaded runs on a busy machine).
    ``settle`` > 0: before its turn in a round each runner waits that long (other runners' idle threads stop
    spinning), then makes untimed calls for at least 20 ms (two at least: its own threads and caches are
    warm again), then ``calls`` timed ones."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    clock = time.thread_time if timer == "cpu" else time.perf_counter
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            if settle:
                time.sleep(settle)
                start, n = time.perf_counter(), 0
                while n < 2 or time.perf_counter() - start < 0.02:
                    run()
                    n += 1
            for _ in range(calls):
                start = clock()
                run()
                samples[name].append(clock() - start)
    return {name: (min(v) if timer == "cpu" else statistics.median(v)) for name, v in samples.items()}


def has_custom_ops(path: Path) -> bool:
    import onnx
    from flgc_lightning.deploy.onnx_custom_ops import custom_nodes
    return bool(custom_nodes(onnx.load(str(path))))


def worker(engine: str, folder: Path, batches: list[int], repeats: int, threads: int, timer: str,
           names: list[str]) -> dict:
    """Time the models ``names`` of ``folder`` in one engine; runs in a child process."""
    keep_freed_memory()
    torch.set_num_threads(threads)
    result = {}
    if engine == "onnxruntime":
        # stock-op files: ONNX Runtime's defaults (spinning worker threads; this process runs nothing else). Files
        # with our custom ops: the helper's default (no spinning), else ONNX Runtime's idle threads take the
        # cores from the kernel's OpenMP threads
        sessions = {name: onnxruntime_session(folder / f"{name}.onnx", threads, spinning=not has_custom_ops(folder / f"{name}.onnx"))
                    for name in names}
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32).numpy()
            result[batch] = time_interleaved(
                {name: (lambda s=s: s.run(None, {"images": x})) for name, s in sessions.items()}, repeats, timer=timer,
                settle=0.2, calls=5)
        return result
    models = {name: torch.load(folder / f"{name}.pt", weights_only=False) for name in names}  # our own files
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if engine == "compiled":
                torch._dynamo.reset()
                runnable = {name: compile_deployed(m) for name, m in models.items()}
                for f in runnable.values():
                    f(x)  # compile now, not inside the timing
            else:
                runnable = models
            result[batch] = time_interleaved({name: (lambda f=f: f(x)) for name, f in runnable.items()}, repeats,
                                             timer=timer)
    return result


def run_worker(engine: str, folder: Path, args) -> dict[int, dict[str, float]]:
    """``{batch: {model: seconds}}`` of one engine, from one child process."""
    cmd = [sys.executable, __file__, "--worker", engine, "--folder", str(folder), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--timer", args.timer, "--batches", *map(str, args.batches),
           "--models", *MODELS]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: the {engine} worker failed:\n{done.stderr[-3000:]}")
    return {int(b): row for b, row in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def run_engines(folder: Path, args) -> dict[str, dict[int, dict[str, float]]]:
    """``{engine: {batch: {model: seconds}}}``: every engine timed in ``args.processes`` child processes, the
    engines' processes interleaved (eager, compiled, ONNX Runtime, eager, ...), and each time the median over the
    processes of their medians. One process's times can sit apart from the next one's (ONNX Runtime's dense
    session at batch 1: 0.58-1.00 ms between processes on an idle machine), so one process per engine let a
    target pass in one run and fail in the next."""
    runs: dict[str, list[dict[int, dict[str, float]]]] = {engine: [] for engine in ENGINES}
    for _ in range(args.processes):
        for engine in ENGINES:
            runs[engine].append(run_worker(engine, folder, args))
    return {engine: {b: {m: statistics.median(r[b][m] for r in per) for m in per[0][b]} for b in per[0]}
            for engine, per in runs.items()}


def check_exactness(models, trained, folder: Path) -> tuple[dict[str, float], float]:
    """max |logit difference| of every deployed form of FLGC (and balanced FLGC, dense_fused) vs its trained network
    (8 random images), and the largest |logit| of the trained FLGC network."""
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = trained["flgc"](x)
        xc = x.contiguous(memory_format=torch.channels_last)
        diffs = {"eager": (models["flgc"](xc) - expected).abs().max().item(),
                 "compiled": (compile_deployed(models["flgc"])(xc) - expected).abs().max().item(),
                 "balanced eager": (models["balanced"](xc) - trained["balanced"](x)).abs().max().item(),
                 "dense_fused eager": (models["dense_fused"](xc) - trained["dense"](x)).abs().max().item()}
    session = onnxruntime_session(folder / "flgc.onnx", 1)
    diffs["onnxruntime"] = float(abs(session.run(None, {"images": x.numpy()})[0] - expected.numpy()).max())
    return diffs, expected.abs().max().item()


def ratio(results, engine_num: str, engine_den: str, batch: int) -> float:
    def pick(model, engine):
        return min(results[e][batch][model] for e in ENGINES) if engine == "best" else results[engine][batch][model]
    return pick("flgc", engine_num) / pick("dense", engine_den)


def print_table(results, batches) -> None:
    print("| model | " + " | ".join(f"{e} b{b} (ms)" for b in batches for e in ENGINES) + " |")
    print("|---|" + "---|" * (len(batches) * len(ENGINES)))
    for model in MODELS:
        cells = [f"{1000 * results[e][b][model]:.2f}" for b in batches for e in ENGINES]
        print(f"| {model} | " + " | ".join(cells) + " |")
    print("\n| batch | " + " | ".join(f"best {m} (ms)" for m in MODELS) + " | best FLGC / best dense |")
    print("|---|" + "---|" * (len(MODELS) + 1))
    for b in batches:
        best = {m: min((results[e][b][m], e) for e in ENGINES) for m in MODELS}
        print(f"| {b} | " + " | ".join(f"{1000 * best[m][0]:.2f} ({best[m][1]})" for m in MODELS)
              + f" | {best['flgc'][0] / best['dense'][0]:.3f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=list(VARIANTS), default="reference",
                        help="reference: projection convs grouped; paper: every 1x1 conv grouped")
    parser.add_argument("--checkpoint", help="trained FLGC checkpoint (its variant and G are used) instead of "
                                             "N(0,1)-initialised assignments")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10,
                        help="interleaved timing rounds per row in each process (median)")
    parser.add_argument("--processes", type=int, default=3,
                        help="child processes per engine, interleaved; a time is the median of their medians")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                        help="wall: median wall-clock time with --threads threads (the targets' measure, needs an "
                             "idle machine); cpu: least CPU time of one thread (forces --threads 1), far less "
                             "sensitive to other load, for comparisons on a busy machine")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.folder), args.batches, args.repeats, args.threads, args.timer,
                                args.models)))
        return 0
    if args.processes < 1 or args.repeats < 1:
        parser.error("--processes and --repeats must be at least 1")
    if args.timer == "cpu":
        args.threads = 1

    torch.set_num_threads(args.threads)
    models, flgc_onnx, trained = build_models(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, model in models.items():
            torch.save(model, folder / f"{name}.pt")
            # FLGC: the CLI's ONNX file; the others with the same exporter (dense ones stay stock ops)
            export_onnx(flgc_onnx if name == "flgc" else model, folder / f"{name}.onnx",
                        kernel="fused" if name in ("flgc", "dense_fused") else "blockdiag")
        diffs, scale = check_exactness(models, trained, folder)
        kernels = "".join(m.kernel[0] for m in models["flgc"].modules() if isinstance(m, UnequalGroupConv2d))
        print(f"torch {torch.__version__}, {args.threads} CPU thread(s), timer {args.timer}, variant {args.variant}, "
              f"groups {args.groups}, "
              f"assignments: {args.checkpoint or f'N(0,1) init, seed {args.seed}'}; fused kernel built with "
              f"{' '.join(native.load_library().flags) if native.available() else 'nothing (unavailable)'}; "
              f"load average before timing {os.getloadavg()[0]:.2f}; {args.processes} processes per engine x "
              f"{args.repeats} rounds, median of the process medians")
        print("MACs (learned groups): " + ", ".join(f"{n} {deployed_macs(m) / 1e6:.2f} M" for n, m in models.items()))
        print(f"FLGC kernel per layer (auto): {kernels} (f = fused, b = block-diagonal)")
        print(f"max |logit difference| deployed vs trained (largest |logit| {scale:.2g}): "
              + ", ".join(f"{e} {d:.2g}" for e, d in diffs.items()) + "\n")
        results = run_engines(folder, args)
    print_table(results, args.batches)
    print("\nAttribution (PyTorch engines): FLGC / the dense network through the same whole-block kernel, "
          "best of eager and compiled: " + ", ".join(
              f"batch {b} {min(results[e][b]['flgc'] for e in ENGINES[:2]) / min(results[e][b]['dense_fused'] for e in ENGINES[:2]):.3f}"
              for b in args.batches))

    bound = 1e-4
    ok = max(diffs.values()) <= bound and scale > 0.5  # logits of order 1: else the bound would say nothing
    note = "" if args.timer == "wall" and args.threads == 2 else "; the targets are defined for --timer wall, 2 threads"
    print(f"\nTargets ({args.variant} variant{note}):")
    print(f"  every deployed form within {bound:.2g} of the trained logits: max {max(diffs.values()):.2g}  "
          f"{'PASS' if ok else 'FAIL'}")
    for label, variant, num, den, batch, bound in TARGETS:
        if variant not in (None, args.variant) or batch not in args.batches:
            continue
        value = ratio(results, num, den, batch)
        passed = value <= bound
        ok &= passed
        print(f"  {label + f', batch {batch}':52s} {value:6.3f}  (target <= {bound:.2f})  {'PASS' if passed else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
