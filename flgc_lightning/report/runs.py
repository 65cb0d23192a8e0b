"""Sweep report: ``python -m flgc_lightning.report MULTIRUN_DIR [--out DIR]``.

Reads every run directory below ``MULTIRUN_DIR`` (its ``summary.json``, written by
:class:`flgc_lightning.callbacks.RunSummary`, or only ``.hydra/config.yaml`` for a run that
died before training started) and writes ``report.md``, ``report.csv`` and ``report.png``
(test accuracy against MACs, one line per conv type). Failed and unfinished runs stay in
the tables with their status; they are never dropped silently.
"""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

from flgc_lightning.callbacks.run_summary import conv_type
from flgc_lightning.cli import ERROR_FILE
from flgc_lightning.errors import UserError

CONV_TYPES = ("dense", "grouped", "FLGC")
STATUS_SHOWN = {"running": "unfinished", "finished": "finished", "failed": "failed", "interrupted": "interrupted"}


@dataclass
class RunRow:
    run: str
    conv_type: str
    groups: Optional[int]
    params: Optional[int]
    macs_nominal: Optional[int]  # uniform-group cost (= actual cost for dense and grouped)
    macs_deployed: Optional[int]  # learned-group cost at the end of training (FLGC), else actual
    best_acc: Optional[float]  # best test (= validation) accuracy, 0-1
    last_acc: Optional[float]
    epochs: Optional[int]
    max_epochs: Optional[int]
    wall_time_s: Optional[float]
    status: str
    error: str = ""


def find_run_dirs(root: Path) -> list[Path]:
    """Directories with a ``summary.json`` or a Hydra ``.hydra/config.yaml`` (resume copies excluded)."""
    runs = {p.parent for p in root.rglob("summary.json")}
    runs |= {p.parent.parent for p in root.rglob("config.yaml") if p.parent.name == ".hydra"}

    def key(path: Path):
        rel = path.relative_to(root).parts
        return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in rel)

    return sorted(runs, key=key)


def _from_summary(name: str, summary: dict) -> RunRow:
    config = summary.get("config") or {}
    kind = config.get("conv_type") or conv_type(int(config.get("groups", 1)), bool(config.get("use_flgc")))
    macs = summary.get("macs")
    deployed = summary.get("macs_deployed")
    if deployed is None and kind != "FLGC":
        deployed = macs  # dense / standard grouped convs run exactly as counted
    status = summary.get("status", "running")
    return RunRow(
        run=name,
        conv_type=kind,
        groups=config.get("groups"),
        params=summary.get("params"),
        macs_nominal=summary.get("macs_nominal", macs),
        macs_deployed=deployed,
        best_acc=summary.get("best_val_acc"),
        last_acc=summary.get("last_val_acc"),
        epochs=summary.get("epochs_done"),
        max_epochs=summary.get("max_epochs"),
        wall_time_s=summary.get("wall_time_s"),
        status=STATUS_SHOWN.get(status, status),
        error=summary.get("error") or "",
    )


def _from_hydra_config(name: str, path: Path) -> RunRow:
    """A run that never reached fit start: only its config tells what it was."""
    from omegaconf import OmegaConf

    groups, use_flgc, max_epochs = None, None, None
    try:
        cfg = OmegaConf.load(path)
        groups = OmegaConf.select(cfg, "model.groups", throw_on_resolution_failure=False)
        groups = groups if groups is not None else OmegaConf.select(cfg, "groups")
        use_flgc = OmegaConf.select(cfg, "model.use_flgc", throw_on_resolution_failure=False)
        max_epochs = OmegaConf.select(cfg, "trainer.max_epochs", throw_on_resolution_failure=False)
    except Exception:  # unreadable config: still list the run
        pass
    kind = conv_type(int(groups), bool(use_flgc)) if groups is not None else "unknown"
    error_file = path.parent.parent / ERROR_FILE
    if error_file.is_file():  # a user error (bad config, missing data) stopped it; cli.py recorded which
        return RunRow(name, kind, groups, None, None, None, None, None, 0, max_epochs, None, "failed",
                      error_file.read_text(errors="replace").strip() or "unknown error")
    return RunRow(name, kind, groups, None, None, None, None, None, 0, max_epochs, None, "failed/unknown",
                  "no summary.json: the run stopped before training started")


def read_run(run_dir: Path, root: Path) -> RunRow:
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            return _from_summary(name, json.loads(summary_path.read_text()))
        except (ValueError, TypeError) as err:
            return RunRow(name, "unknown", None, None, None, None, None, None, None, None, None,
                          "failed/unknown", f"unreadable summary.json: {err}")
    return _from_hydra_config(name, run_dir / ".hydra" / "config.yaml")


def collect(root: Path) -> list[RunRow]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"'{root}' is not a directory; pass a multirun directory, e.g. multirun/<date>/<time>")
    rows = [read_run(d, root) for d in find_run_dirs(root)]
    if not rows:
        raise UserError(f"no runs under '{root}' (no summary.json or .hydra/config.yaml found)")
    order = {k: i for i, k in enumerate(CONV_TYPES)}
    return sorted(rows, key=lambda r: (order.get(r.conv_type, 9), r.groups or 0, r.run))


# -- formatting ------------------------------------------------------------------------------
def _millions(value: Optional[float]) -> str:
    return "–" if value is None else f"{value / 1e6:.2f} M"


def _percent(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _status(row: RunRow) -> str:
    if not row.error or row.status == "finished":
        return row.status
    first = row.error.strip().splitlines()[0] if row.error.strip() else ""
    return f"{row.status}: {first[:80]}".replace("|", "\\|")


HEADER = ("run", "conv type", "groups", "params", "MACs nominal", "MACs deployed",
          "best test acc %", "last test acc %", "epochs", "wall time", "status")


def markdown_table(rows: Sequence[RunRow]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for r in rows:
        epochs = "–" if r.epochs is None else f"{r.epochs}" + (f"/{r.max_epochs}" if r.max_epochs else "")
        cells = (r.run, r.conv_type, "–" if r.groups is None else str(r.groups), _millions(r.params),
                 _millions(r.macs_nominal), _millions(r.macs_deployed), _percent(r.best_acc), _percent(r.last_acc),
                 epochs, _duration(r.wall_time_s), _status(r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(rows: Sequence[RunRow], path: Path, source: Path) -> str:
    table = markdown_table(rows)
    text = (
        f"# Sweep report: {source}\n\n{table}\n\n"
        "MACs per image. *Nominal*: uniform groups (dense cost / G for FLGC). *Deployed*: the learned, "
        "unequal FLGC groups at the end of training (sum over groups of |in_g|·|out_g|·k²·H·W); for dense "
        "and standard grouped convs both equal the actual cost. Test accuracy is the validation metric "
        "(the test split doubles as validation). *unfinished*: still running or killed; *failed: …*: the "
        "error that stopped the run; *failed/unknown*: stopped before training began without recording "
        "why.\n\n![accuracy vs MACs](report.png)\n"
    )
    path.write_text(text)
    return table


def write_csv(rows: Sequence[RunRow], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(RunRow)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def plot(rows: Sequence[RunRow], path: Path) -> None:
    """Best test accuracy against MACs; finished runs joined per conv type, others hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"dense": ("tab:gray", "*"), "grouped": ("tab:blue", "s"), "FLGC": ("tab:red", "o")}
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    unplotted = 0
    for kind in list(CONV_TYPES) + sorted({r.conv_type for r in rows} - set(CONV_TYPES)):
        color, marker = styles.get(kind, ("tab:green", "^"))
        runs = [r for r in rows if r.conv_type == kind]
        points = [(r.macs_deployed or r.macs_nominal, r) for r in runs if r.best_acc is not None
                  and (r.macs_deployed or r.macs_nominal)]
        unplotted += len(runs) - len(points)
        done = sorted(((x, r) for x, r in points if r.status == "finished"), key=lambda p: p[0])
        if done:
            ax.plot([x / 1e6 for x, _ in done], [100 * r.best_acc for _, r in done], marker=marker, color=color,
                    markersize=9 if marker == "*" else 7, linewidth=1.5, label=kind)
        partial = [(x, r) for x, r in points if r.status != "finished"]
        if partial:
            ax.scatter([x / 1e6 for x, _ in partial], [100 * r.best_acc for _, r in partial], marker=marker,
                       facecolors="none", edgecolors=color, s=55, label=f"{kind} (not finished)")
        for x, r in points:
            ax.annotate(f"G={r.groups}", (x / 1e6, 100 * r.best_acc), textcoords="offset points",
                        xytext=(5, 5), fontsize=8, color=color)
    ax.set_xlabel("MACs per image (millions; FLGC: learned groups at end of training)")
    ax.set_ylabel("best test accuracy (%)")
    title = "Test accuracy vs. compute"
    if unplotted:
        title += f"  ({unplotted} run(s) without results not plotted, see table)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.08, y=0.1)  # room for the G= labels
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def make_report(root: Path, out: Optional[Path] = None) -> tuple[list[RunRow], str]:
    root = Path(root).expanduser()
    rows = collect(root)
    out = Path(out).expanduser() if out else root
    out.mkdir(parents=True, exist_ok=True)
    table = write_markdown(rows, out / "report.md", root)
    write_csv(rows, out / "report.csv")
    plot(rows, out / "report.png")
    return rows, table


def main(argv: Optional[Sequence[str]] = None) -> None:
    from flgc_lightning.cli import report_user_errors

    parser = argparse.ArgumentParser(prog="python -m flgc_lightning.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", type=Path, help="a multirun directory (multirun/<date>/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.* (default: multirun_dir)")
    args = parser.parse_args(argv)

    def run() -> None:
        _, table = make_report(args.multirun_dir, args.out)
        out = args.out or args.multirun_dir
        print(table)
        print(f"\nwrote {out / 'report.md'}, {out / 'report.csv'}, {out / 'report.png'}")

    report_user_errors(run)


if __name__ == "__main__":
    main()
