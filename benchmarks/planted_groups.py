"""Planted groups: which estimator finds a block structure that is known to be there? (issue 18)

    python benchmarks/planted_groups.py                 # 6 teachers, about 6 minutes on one CPU thread
    python benchmarks/planted_groups.py --seeds 2 --steps 1000

Teacher: 1x1 conv 64 -> 64, G = 8 groups of unequal sizes on both sides, block-diagonal under hidden
permutations, then a train-mode BatchNorm. Student: Flgc2d(G=8) + BatchNorm2d from N(0, 1) logits, SGD
with momentum on the MSE to the teacher's outputs for Gaussian inputs (flgc_lightning.assignments.planted).
Each row: one estimator setting, over one teacher (and student seed) per seed. ARI: adjusted Rand index
against the planted groups (1 = found, ~0 = chance); min = the worst teacher. Loss: final MSE; the
frozen-random-groups student is the control a learned grouping must beat, and 0 is reachable.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flgc_lightning

import torch  # noqa: E402

from flgc_lightning.assignments.planted import StudentConfig, make_teacher, train_student  # noqa: E402

REGROUP = dict(regroup_at=(0.2, 0.4, 0.6), freeze_at=0.6)
GUMBEL_TAU = dict(tau_start=5.0, tau_end=1.0)  # the best of the schedules tried for gumbel alone


def settings() -> list[tuple[str, StudentConfig]]:
    rows = [("frozen random groups (control)", StudentConfig(frozen=True))]
    for regroup in (False, True):
        for estimator in ("reference", "ste", "gumbel"):
            for dense in (False, True):
                config = StudentConfig(assign_grad=estimator, dense_weight_grad=dense,
                                       **(GUMBEL_TAU if estimator == "gumbel" else {}), **(REGROUP if regroup else {}))
                rows.append((f"{estimator:9s} dense_w={'yes' if dense else 'no ':3s} regroup={'yes' if regroup else 'no'}",
                             config))
    rows.append(("co-clustering only (logits frozen), dense_w=yes regroup=yes",
                 StudentConfig(frozen=True, dense_weight_grad=True, **REGROUP)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=6, help="teachers (and student seeds) per row")
    parser.add_argument("--steps", type=int, default=None, help="SGD steps per student (default: StudentConfig's)")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--groups", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    teachers = [make_teacher(args.channels, args.channels, args.groups, seed=s) for s in range(args.seeds)]
    default = StudentConfig()
    steps = args.steps or default.steps
    print(f"teacher {args.channels}->{args.channels}, G={args.groups}, {args.seeds} teachers; student: SGD momentum "
          f"{default.momentum}, lr {default.lr} (weights, BN), {default.logit_lr} (logits), batch {default.batch}, "
          f"{steps} steps; regroup = co-cluster |W| at {REGROUP['regroup_at']} of the run, groups frozen from "
          f"{REGROUP['freeze_at']}; gumbel tau {GUMBEL_TAU['tau_start']} -> {GUMBEL_TAU['tau_end']}")
    print()
    print("| setting | ARI inputs mean (min) | ARI filters mean (min) | final loss mean | s/run |")
    print("|---|---|---|---|---|")
    for name, config in settings():
        config = replace(config, steps=steps)
        start = time.perf_counter()
        results = [train_student(t, args.groups, config, seed=s) for s, t in enumerate(teachers)]
        seconds = (time.perf_counter() - start) / len(results)
        ins, outs = [r.ari_inputs for r in results], [r.ari_filters for r in results]
        loss = statistics.mean(r.loss for r in results)
        print(f"| {name} | {statistics.mean(ins):.3f} ({min(ins):.3f}) | {statistics.mean(outs):.3f} ({min(outs):.3f}) "
              f"| {loss:.4f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
