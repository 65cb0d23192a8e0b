"""Training-step time of MobileNetV2 with dense, standard grouped and FLGC projection convs.

All models are timed in one process, interleaved round by round, so the ratios are
comparable. Goal: FLGC <= 1.10x dense.

    python benchmarks/train_step.py [--groups 8] [--batch 128] [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from flgc_lightning.models import MobileNetV2

GOAL = 1.10


def make_step(model: torch.nn.Module, device: torch.device, batch: int):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=4e-5)
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(device: torch.device, groups: int, batch: int, repeats: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    models = {
        "dense": MobileNetV2(groups=1),
        f"grouped G={groups}": MobileNetV2(groups=groups, use_flgc=False),
        f"FLGC G={groups}": MobileNetV2(groups=groups, use_flgc=True),
    }
    steps = {name: make_step(m.to(device).train(), device, batch) for name, m in models.items()}
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved: drift in machine load hits every model alike
        for name, step in steps.items():
            times[name].append(timed(step, device))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    worst = 0.0
    for device in devices:
        result = bench(device, args.groups, args.batch, args.repeats, args.warmup)
        dense = result["dense"]
        label = f"{device.type} ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name()
        print(f"\ntrain step, batch {args.batch}, {label}, median of {args.repeats}")
        print(f"{'model':<16} {'ms/step':>9} {'x dense':>8}")
        for name, seconds in result.items():
            print(f"{name:<16} {seconds * 1e3:>9.1f} {seconds / dense:>8.3f}")
        ratio = result[f"FLGC G={args.groups}"] / dense
        worst = max(worst, ratio)
        print(f"FLGC / dense = {ratio:.3f} (goal <= {GOAL:.2f}: {'met' if ratio <= GOAL else 'NOT met'})")
    raise SystemExit(0 if worst <= GOAL else 1)


if __name__ == "__main__":
    main()
