"""Inference latency: dense vs standard grouped vs FLGC (training form) vs FLGC deployed.

    python benchmarks/inference.py [--groups 8] [--repeats 15] [--checkpoint FLGC.ckpt]

All in one process. Rows: CPU eager PyTorch and ONNX Runtime (both ``--threads`` threads, default
2), plus CUDA eager when a GPU is present; batch 1 and 64; float32. Models are timed interleaved
(one call of each per round) and medians reported, so background load hits all rows alike.
Dense and standard-grouped models are deployed exactly like FLGC (BN folded, channels_last);
FLGC is deployed three times: ``flgc_padded`` (every layer a padded grouped conv),
``flgc_fused`` (every layer the compiled unequal-group kernel) and ``flgc_auto`` (per layer the
fastest of the three, timed at deploy time: what ``python -m flgc_lightning.deploy`` gives);
the training form runs as the reference runs it (eval mode, masked dense conv, BN unfolded).
The compiled kernel is CPU-only: CUDA runs the padded form of fused layers, and ONNX Runtime runs
``flgc_fused``/``flgc_auto`` exported with block-diagonal layers (``export_onnx(kernel="blockdiag")``,
the faster form there) and ``flgc_padded`` exported padded.

glibc's malloc returns freed memory of big tensors to the OS and page-faults it back in on the
next call, which made single runs vary by up to 1.5x; like the jemalloc/tcmalloc advice of
PyTorch's CPU tuning guides, the script keeps that memory (``mallopt``) for every model alike;
``--no-malloc-tuning`` measures without.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flgc_lightning.deploy import (  # noqa: E402
    UnequalGroupConv2d, deploy_model, deployed_macs, executed_macs, export_onnx, layer_group_report, native,
    onnxruntime_session,
)
from flgc_lightning.models import MobileNetV2  # noqa: E402
from flgc_lightning.utils.complexity import count_macs  # noqa: E402

DEPLOYED = ("flgc_fused", "flgc_auto")  # the targets are checked for these
# ONNX has no unequal-group op: the fused variants export as block-diagonal convs, which ONNX Runtime runs
# at dense speed; flgc_padded shows the grouped (padded) export.
ONNX_EXPORT_KERNEL = {"flgc_padded": "padded", "flgc_fused": "blockdiag", "flgc_auto": "blockdiag"}
TARGETS = (  # (label, numerator, denominator, bound, direction); "{d}" is a deployed variant
    ("{d} / dense", "{d}", "dense", 0.90, "<="),
    ("{d} / standard grouped", "{d}", "grouped", 1.05, "<="),
    ("training form / {d}", "flgc_train", "{d}", 1.30, ">="),
)


def build_models(groups: int, checkpoint: str | None, seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    if checkpoint:
        from flgc_lightning.deploy import load_trained_network
        flgc, input_size = load_trained_network(checkpoint)
        if tuple(input_size) != (3, 32, 32):
            raise SystemExit(f"error: {checkpoint} was trained on {input_size} inputs; the benchmark compares "
                             "CIFAR networks (3 x 32 x 32)")
    else:  # assignments as initialised: N(0, 1) logits, i.e. uniformly random unequal groups
        flgc = MobileNetV2(groups=groups, use_flgc=True)
    flgc.eval()
    return {
        "dense": deploy_model(MobileNetV2()),
        "grouped": deploy_model(MobileNetV2(groups=groups)),
        "flgc_train": flgc,
        "flgc_padded": deploy_model(flgc, kernel="padded"),
        "flgc_fused": deploy_model(flgc, kernel="fused"),
        "flgc_auto": deploy_model(flgc, kernel="auto"),
    }


def keep_freed_memory() -> str:
    """Stop glibc from trimming/unmapping freed heap memory (see the module docstring)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "malloc: not glibc, left as is"
    m_trim_threshold, m_top_pad = -1, -2
    ok = libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_top_pad, 512 << 20)
    return "malloc: glibc, freed memory kept (mallopt M_TRIM_THRESHOLD, M_TOP_PAD)" if ok else "malloc: mallopt failed"


def time_interleaved(runners: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each runner, rounds interleaved across runners."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def torch_runner(model, x, sync=lambda: None):
    def run():
        with torch.inference_mode():
            model(x)
        sync()
    return run


def model_input(name: str, x: torch.Tensor) -> torch.Tensor:
    """Deployed models take channels_last; the training form runs NCHW, as the reference runs it."""
    return x if name == "flgc_train" else x.contiguous(memory_format=torch.channels_last)


def torch_cpu_row(models, batch, repeats):
    x = torch.randn(batch, 3, 32, 32)
    runners = {name: torch_runner(model, model_input(name, x)) for name, model in models.items()}
    return time_interleaved(runners, repeats)


def onnxruntime_rows(models, batches, repeats, threads, onnx_dir):
    """``{batch: {model: seconds}}``, measured after every PyTorch row: ORT's sessions (memory arenas,
    spinning worker threads) made the PyTorch rows timed after their creation up to 1.7x slower."""
    sessions = {}
    for name, model in models.items():
        path = export_onnx(model, Path(onnx_dir) / f"{name}.onnx", example=torch.randn(1, 3, 32, 32),
                           kernel=ONNX_EXPORT_KERNEL.get(name))
        sessions[name] = onnxruntime_session(path, threads)
    rows = {}
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32).numpy()
        runners = {name: (lambda s=s, x=x: s.run(None, {s.get_inputs()[0].name: x})) for name, s in sessions.items()}
        rows[batch] = time_interleaved(runners, repeats)
    return rows


def cuda_rows(models, batch, repeats):
    x = torch.randn(batch, 3, 32, 32, device="cuda")
    runners = {name: torch_runner(model.to("cuda"), model_input(name, x), torch.cuda.synchronize)
               for name, model in models.items()}
    return time_interleaved(runners, repeats)


def ratio(row, num, den) -> float:
    return row[num] / row[den]


def print_table(results, names):
    header = "| device / engine | batch | " + " | ".join(f"{n} (ms)" for n in names) + " |"
    print(header)
    print("|" + "---|" * (len(names) + 2))
    for (engine, batch), row in results.items():
        print(f"| {engine} | {batch} | " + " | ".join(f"{1000 * row[n]:.2f}" for n in names) + " |")
    labels = [t[0].format(d=d) for d in DEPLOYED for t in TARGETS]
    print("\n| device / engine | batch | " + " | ".join(labels) + " |")
    print("|" + "---|" * (len(labels) + 2))
    for (engine, batch), row in results.items():
        cells = [ratio(row, t[1].format(d=d), t[2].format(d=d)) for d in DEPLOYED for t in TARGETS]
        print(f"| {engine} | {batch} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds per row (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", help="trained FLGC checkpoint to use instead of N(0,1)-initialised assignments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc as it is")
    args = parser.parse_args(argv)
    malloc = "malloc: left as is (--no-malloc-tuning)" if args.no_malloc_tuning else keep_freed_memory()
    torch.set_num_threads(args.threads)
    models = build_models(args.groups, args.checkpoint, args.seed)
    names = list(models)

    print(f"torch {torch.__version__}, {args.threads} CPU threads, groups={args.groups}, "
          f"assignments: {args.checkpoint or f'N(0,1) init, seed {args.seed}'}; {malloc}; "
          f"fused kernel built with {' '.join(native.load_library().flags)}")
    print(layer_group_report(models["flgc_train"]))
    macs = {n: deployed_macs(m) for n, m in models.items() if n != "flgc_train"}
    print("MACs (learned groups): " + ", ".join(f"{n} {v / 1e6:.2f} M" for n, v in macs.items())
          + f"; training form runs {count_macs(models['flgc_train'], flgc_cost='dense') / 1e6:.2f} M")
    print("MACs executed by the deployed kernels (padding / zeros / vector lanes included): "
          + ", ".join(f"{n} {executed_macs(models[n]) / 1e6:.2f} M" for n in ("flgc_padded", *DEPLOYED)))
    print("auto kernel choice per FLGC layer: "
          + "".join(m.kernel[0] for m in models["flgc_auto"].modules() if isinstance(m, UnequalGroupConv2d))
          + " (f = fused, p = padded grouped conv, b = block-diagonal dense conv)\n")

    results = {}
    for batch in args.batches:
        results[("CPU torch", batch)] = torch_cpu_row(models, batch, args.repeats)
    with tempfile.TemporaryDirectory() as onnx_dir:
        for batch, row in onnxruntime_rows(models, args.batches, args.repeats, args.threads, onnx_dir).items():
            results[("CPU onnxruntime", batch)] = row
    if torch.cuda.is_available():
        for batch in args.batches:
            results[("CUDA torch", batch)] = cuda_rows(models, batch, args.repeats)
    print_table(results, names)

    ok = True
    print("\nTargets (CPU eager PyTorch, batch 64):")
    row = results.get(("CPU torch", 64))
    if row is None:
        print("  batch 64 not measured")
        return 1
    for deployed in DEPLOYED:
        for label, num, den, bound, direction in TARGETS:
            value = ratio(row, num.format(d=deployed), den.format(d=deployed))
            passed = value <= bound if direction == "<=" else value >= bound
            ok &= passed
            print(f"  {label.format(d=deployed):36s} {value:6.3f}  (target {direction} {bound:.2f})  "
                  f"{'PASS' if passed else 'FAIL'}")
    return 0 if ok else 2


if __name__ == "__main__":
    raise SystemExit(main())
