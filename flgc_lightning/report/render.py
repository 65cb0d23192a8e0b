"""The sweep report's files: ``report.md`` (tables), ``report.csv`` (one row per run),
``report_summary.csv`` (one row per configuration) and ``report.png`` (accuracy against MACs)."""
from __future__ import annotations

import csv
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional, Sequence

from flgc_lightning.report.runs import CONV_TYPES, RunRow
from flgc_lightning.report.stats import Comparison, ConfigGroup, Summary


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


def _mean_std(s: Summary, scale: float = 100.0, digits: int = 2) -> str:
    if s.n == 0:
        return "–"
    if s.std is None:
        return f"{scale * s.mean:.{digits}f} (n=1)"
    return f"{scale * s.mean:.{digits}f} ± {scale * s.std:.{digits}f}"


def _interval(s: Summary) -> str:
    if s.low is None:
        return "–"
    return f"[{100 * s.low:+.2f}, {100 * s.high:+.2f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


RUN_HEADER = ("run", "conv type", "groups", "seed", "params", "MACs nominal", "MACs deployed",
              "best val acc %", "test acc % (selected)", "channels ever moved", "group-size imbalance", "epochs",
              "wall time", "status")


def runs_table(rows: Sequence[RunRow]) -> str:
    cells = []
    for r in rows:
        epochs = "–" if r.epochs is None else f"{r.epochs}" + (f"/{r.max_epochs}" if r.max_epochs else "")
        cells.append((r.run, r.conv_type, "–" if r.groups is None else str(r.groups),
                      "–" if r.seed is None else str(r.seed), _millions(r.params), _millions(r.macs_nominal),
                      _millions(r.macs_deployed), _percent(r.best_acc), _percent(r.test_acc),
                      "–" if r.channels_ever_moved is None else str(r.channels_ever_moved),
                      "–" if r.group_size_imbalance is None else f"{r.group_size_imbalance:.2f}", epochs,
                      _duration(r.wall_time_s), _status(r)))
    return _table(RUN_HEADER, cells)


def accuracy_label(rows: Sequence[RunRow]) -> str:
    """What the compared accuracy is; says plainly when it was selected on the test split."""
    on_test = [r.validation == "test split" for r in rows]
    if any(r.test_acc is not None for r in rows):
        if not any(on_test):
            return "test accuracy of the checkpoint selected on validation (held-out training images)"
        if all(on_test):
            return ("test accuracy of the checkpoint selected on the test split (validation = test, the reference "
                    "setting: optimistic)")
        return ("test accuracy of the selected checkpoint (selected on held-out training images, or on the test "
                "split where the validation column says so: optimistic there)")
    if all(on_test):
        return "best test accuracy (validation = test, the reference setting: selected on the test split, optimistic)"
    return "best validation accuracy"


GROUP_HEADER = ("configuration", "conv type", "G", "n", "accuracy % (mean ± std)", "95 % interval of the mean",
                "val cross-entropy (mean ± std)", "MACs deployed (mean)", "channels ever moved (inputs / filters)",
                "moves to init runner-up", "group-size imbalance", "validation")


def groups_table(groups: Sequence[ConfigGroup]) -> str:
    cells = []
    for g in groups:
        acc, loss = g.summary("selected_acc"), g.summary("val_loss")
        macs, moved, imbalance = g.summary("macs_deployed"), g.summary("channels_ever_moved"), g.summary("group_size_imbalance")
        inputs, filters, runner_up = g.summary("moved_inputs"), g.summary("moved_filters"), g.summary("runner_up_share")
        split = f" ({inputs.mean:.1f} / {filters.mean:.1f})" if inputs.n and filters.n else ""
        cells.append((g.key.replace("|", "\\|"), g.conv_type, "–" if g.groups is None else str(g.groups),
                      f"{acc.n}/{len(g.runs)}", _mean_std(acc),
                      "–" if acc.low is None else f"[{100 * acc.low:.2f}, {100 * acc.high:.2f}]",
                      _mean_std(loss, scale=1.0, digits=3),
                      _millions(macs.mean), "–" if moved.n == 0 else f"{moved.mean:.1f}{split}",
                      "–" if runner_up.n == 0 else f"{100 * runner_up.mean:.0f} %",
                      "–" if imbalance.n == 0 else f"{imbalance.mean:.2f}", g.runs[0].validation))
    return _table(GROUP_HEADER, cells)


COMPARISON_HEADER = ("G", "comparison", "paired seeds", "mean difference (points)", "95 % interval", "reading")


def comparisons_table(comparisons: Sequence[Comparison], scale: float = 100.0,
                      header: Sequence[str] = COMPARISON_HEADER) -> str:
    cells = []
    for c in comparisons:
        s = c.summary
        pooled = c.treatment.groups is None
        digits = 2 if scale == 100.0 else 3
        cells.append(("all" if pooled else str(c.treatment.groups), f"{c.treatment.conv_type} − {c.control.conv_type}",
                      f"{len(c.seeds)} pairs ({c.treatment.key.split('(', 1)[1][:-1]} × seeds)" if pooled
                      else ", ".join(map(str, c.seeds)) or "none", "–" if s.n == 0 else f"{scale * s.mean:+.{digits}f}",
                      "–" if s.low is None else f"[{scale * s.low:+.{digits}f}, {scale * s.high:+.{digits}f}]",
                      c.verdict))
    return _table(header, cells)


def write_markdown(rows: Sequence[RunRow], groups: Sequence[ConfigGroup], comparisons: Sequence[Comparison],
                   path: Path, source: Path, pooled: Sequence[Comparison] = (),
                   losses: Sequence[Comparison] = ()) -> str:
    label = accuracy_label(rows)
    sections = [f"# Sweep report: {source}\n"]
    if any(len(g.runs) > 1 for g in groups) or comparisons:
        sections += [f"## Configurations (runs that differ only in seed)\n\nAccuracy: {label}; mean ± std "
                     "over seeds (sample std), and the 95 % t-interval of the mean.\n", groups_table(groups), ""]
    if comparisons:
        sections += ["## Paired comparisons at equal G\n\nDifference in accuracy (percentage points), seed by "
                     "seed (same seed = same data order and augmentation; FLGC and its frozen control also start "
                     "from the same weights and groups), with the 95 % t-interval of the mean difference. An "
                     "interval that contains 0 shows no difference. Each row is its own 95 % interval, with no "
                     f"correction for the {len(comparisons)} comparisons: about 1 in 20 true nulls lands outside 0 "
                     "by chance.\n", comparisons_table(comparisons), ""]
    if pooled:
        sections += ["### Pooled over G\n\nThe same differences, all G together (n = seeds × G): a tighter interval "
                     "for the difference averaged over the G values studied, assuming pairs at different G vary "
                     "alike. A difference that depends on G can hide here; read it with the rows above.\n",
                     comparisons_table(pooled), ""]
    if losses:
        sections += ["## Paired comparisons of validation cross-entropy\n\nThe same pairs, on the validation "
                     "cross-entropy of the selected epoch (lower is better; less noisy than accuracy on a few hundred "
                     "images). Rows with G 'all' are pooled over G.\n",
                     comparisons_table(losses, scale=1.0, header=("G", "comparison", "paired seeds",
                                                                  "mean difference", "95 % interval", "reading")), ""]
    sections += ["## Runs\n", runs_table(rows), "",
                 "MACs per image. *Nominal*: uniform groups (dense cost / G for FLGC). *Deployed*: the learned, "
                 "unequal FLGC groups at the end of training (sum over groups of |in_g|·|out_g|·k²·H·W); for dense "
                 "and standard grouped convs both equal the actual cost. *best val acc*: the validation split is "
                 "the test split in the reference setting (then the best epoch is chosen on test data) or held-out "
                 "training images (`data.val_size`). *test acc (selected)*: test accuracy of the checkpoint chosen "
                 "on validation (`test_after_fit=true`). *channels ever moved*: FLGC input channels and filters "
                 "whose group changed at some epoch end; *moves to init runner-up*: the share of moves (seen at epoch "
                 "ends) whose new group was the channel's second choice at initialisation (the only place the "
                 "reference estimator lets a channel go). *group-size imbalance*: largest / mean group size, averaged "
                 "over FLGC layers (1.00 = equal). *unfinished*: still running or killed; *failed: …*: the "
                 "error that stopped the run; *failed/unknown*: stopped before training began without recording "
                 "why.\n", "![accuracy vs MACs](report.png)\n"]
    text = "\n".join(sections)
    path.write_text(text)
    return text


def write_csv(rows: Sequence[RunRow], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(RunRow)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def write_summary_csv(groups: Sequence[ConfigGroup], comparisons: Sequence[Comparison], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["kind", "configuration", "conv_type", "groups", "n", "mean", "std", "ci_low", "ci_high",
                         "macs_deployed_mean", "channels_ever_moved_mean", "group_size_imbalance_mean"])
        for g in groups:
            s = g.summary("selected_acc")
            writer.writerow(["configuration", g.key, g.conv_type, g.groups, s.n, s.mean, s.std, s.low, s.high,
                             g.summary("macs_deployed").mean, g.summary("channels_ever_moved").mean,
                             g.summary("group_size_imbalance").mean])
        for c in comparisons:
            s = c.summary
            writer.writerow(["difference" if c.treatment.groups is not None else "pooled difference",
                             f"{c.treatment.key} minus {c.control.key}",
                             f"{c.treatment.conv_type}-{c.control.conv_type}", c.treatment.groups or "all", s.n, s.mean,
                             s.std, s.low, s.high, "", "", ""])


STYLES = {"dense": ("tab:gray", "*"), "grouped": ("tab:blue", "s"), "FLGC": ("tab:red", "o"),
          "FLGC-frozen": ("tab:orange", "v"), "FLGC-balanced": ("tab:green", "D")}


def plot(rows: Sequence[RunRow], groups: Sequence[ConfigGroup], path: Path) -> None:
    """Accuracy against deployed MACs: per configuration the mean over seeds with ± std error bars
    (single runs as plain points), one line per conv type; unfinished runs hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.transforms import offset_copy

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    kinds = list(CONV_TYPES) + sorted({g.conv_type for g in groups} - set(CONV_TYPES))
    # conv types drawn a few screen points apart, so equal-MAC points (grouped and balanced FLGC) stay visible;
    # the data coordinates stay exact
    shift = {kind: offset_copy(ax.transData, fig=fig, x=3.0 * (i - (len(kinds) - 1) / 2), units="points")
             for i, kind in enumerate(kinds)}
    unplotted = 0
    for kind in kinds:
        color, marker = STYLES.get(kind, ("tab:purple", "^"))
        points = []
        for g in (g for g in groups if g.conv_type == kind):
            acc, macs = g.summary("selected_acc"), g.summary("macs_deployed")
            unplotted += len(g.runs) - acc.n
            if acc.n and macs.mean:
                points.append((macs.mean / 1e6, 100 * acc.mean, 100 * (acc.std or 0.0), g))
        points.sort(key=lambda p: p[0])
        if points:
            counts = sorted({p[3].summary("selected_acc").n for p in points})
            n = f"n={counts[0]}" if len(counts) == 1 else f"n={counts[0]}-{counts[-1]}"
            drawn = ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                                marker=marker, color=color, markersize=9 if marker == "*" else 6, linewidth=1.3,
                                capsize=3, label=f"{kind} ({n} seeds)")
            for artist in drawn.get_children():  # after autoscaling, so the axes still fit the data
                artist.set_transform(shift[kind])
            for x, y, _, g in points:
                ax.annotate(f"G={g.groups}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7, color=color)
        partial = [r for r in rows if r.conv_type == kind and r.status != "finished" and r.selected_acc is not None
                   and (r.macs_deployed or r.macs_nominal)]
        if partial:
            ax.scatter([(r.macs_deployed or r.macs_nominal) / 1e6 for r in partial], [100 * r.selected_acc for r in partial],
                       marker=marker, facecolors="none", edgecolors=color, s=55, label=f"{kind} (not finished)")
    ax.set_xlabel("MACs per image (millions; FLGC: learned groups at the end of training)")
    ax.set_ylabel(accuracy_label(rows).split(" (")[0] + " (%)")
    title = "Accuracy vs. compute (mean ± std over seeds)"
    if unplotted:
        title += f"  ({unplotted} run(s) without results not plotted, see table)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.08, y=0.1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
