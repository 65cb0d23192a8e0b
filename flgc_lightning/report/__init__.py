"""Sweep report: ``python -m flgc_lightning.report MULTIRUN_DIR [--out DIR]``.

Reads every run below ``MULTIRUN_DIR`` (:mod:`~flgc_lightning.report.runs`), groups runs that differ
only in their seed and compares conv types seed by seed at equal G
(:mod:`~flgc_lightning.report.stats`), and writes ``report.md``, ``report.csv``,
``report_summary.csv`` and ``report.png`` (:mod:`~flgc_lightning.report.render`).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from flgc_lightning.report.render import plot, write_csv, write_markdown, write_summary_csv
from flgc_lightning.report.runs import RunRow, collect
from flgc_lightning.report.stats import group_by_seed, paired_comparisons, pooled_comparisons

__all__ = ["RunRow", "collect", "main", "make_report"]


def make_report(root: Path, out: Optional[Path] = None) -> tuple[list[RunRow], str]:
    root = Path(root).expanduser()
    rows = collect(root)
    groups = group_by_seed(rows)
    comparisons = paired_comparisons(groups, "selected_acc")
    pooled = pooled_comparisons(comparisons)
    losses = paired_comparisons(groups, "val_loss")  # validation cross-entropy: less noisy than accuracy
    losses = losses + pooled_comparisons(losses) if any(c.differences for c in losses) else []
    out = Path(out).expanduser() if out else root
    out.mkdir(parents=True, exist_ok=True)
    text = write_markdown(rows, groups, comparisons, out / "report.md", root, pooled, losses)
    write_csv(rows, out / "report.csv")
    write_summary_csv(groups, [*comparisons, *pooled, *losses], out / "report_summary.csv")
    plot(rows, groups, out / "report.png")
    return rows, text


def main(argv: Optional[Sequence[str]] = None) -> None:
    from flgc_lightning.cli import report_user_errors

    parser = argparse.ArgumentParser(prog="python -m flgc_lightning.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", type=Path, help="a multirun directory (multirun/<date>/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.* (default: multirun_dir)")
    args = parser.parse_args(argv)

    def run() -> None:
        _, text = make_report(args.multirun_dir, args.out)
        out = args.out or args.multirun_dir
        print(text)
        print(f"\nwrote {out / 'report.md'}, {out / 'report.csv'}, {out / 'report_summary.csv'}, {out / 'report.png'}")

    report_user_errors(run)
