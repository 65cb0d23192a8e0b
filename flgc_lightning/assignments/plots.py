"""PNG pictures of assignment records (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from flgc_lightning.assignments.table import epoch_label  # noqa: E402


def _group_colors(num_groups: int) -> list:
    cmap = plt.get_cmap("tab10" if num_groups <= 10 else "tab20")
    return [cmap(g % cmap.N) for g in range(num_groups)]


def plot_layer_movement(records: Sequence[dict], path: Path) -> Path:
    """Group sizes (stacked, inputs and filters) and channels moved per epoch, for one layer's records."""
    first = records[0]
    groups = first["groups"]
    x = np.arange(len(records))
    labels = [epoch_label(r) for r in records]
    colors = _group_colors(groups)
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True, constrained_layout=True)
    for ax, side in zip(axes[:2], ("inputs", "filters")):
        sizes = np.array([r[side]["sizes"] for r in records]).T  # groups x epochs
        ax.stackplot(x, sizes, labels=[f"g{g}" for g in range(groups)], colors=colors)
        ax.set_ylabel(f"{side} per group")
        ax.set_ylim(0, sizes.sum(axis=0).max())
        ax.set_xlim(x[0] - 0.5, x[-1] + 0.5)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="group")
    width = 0.4
    moved_in = [r["inputs"]["moved"] for r in records]
    moved_out = [r["filters"]["moved"] for r in records]
    axes[2].bar(x - width / 2, moved_in, width, label="inputs moved")
    axes[2].bar(x + width / 2, moved_out, width, label="filters moved")
    empty = [r["num_empty_groups"] for r in records]
    if any(empty):
        twin = axes[2].twinx()
        twin.plot(x, empty, color="black", marker="o", label="empty groups")
        twin.set_ylabel("empty groups")
        twin.set_ylim(0, max(empty) * 1.4 + 0.5)
        twin.yaxis.get_major_locator().set_params(integer=True)
        twin.legend(loc="upper right", fontsize=8)
    axes[2].set_ylabel("channels moved")
    axes[2].set_ylim(0, max(1, *moved_in, *moved_out) * 1.3)
    axes[2].yaxis.get_major_locator().set_params(integer=True)
    axes[2].legend(loc="upper left", fontsize=8)
    axes[2].set_xlabel("epoch")
    step = max(1, len(x) // 20)
    axes[2].set_xticks(x[::step], labels[::step])
    fig.suptitle(f"layer {first['layer']} ({first['name']}, {first['in_channels']}->{first['out_channels']}, "
                 f"G={groups}): group sizes and movement")
    return _save(fig, path)


def block_order(ids: np.ndarray) -> np.ndarray:
    """Channel order that makes each group contiguous (stable: channel order kept inside a group)."""
    return np.argsort(ids, kind="stable")


def plot_block_structure(input_ids: np.ndarray, filter_ids: np.ndarray, num_groups: int, title: str,
                         path: Path) -> Path:
    """The layer's mask (filters x inputs) in channel order and with both sides reordered by group.

    A connected cell is coloured by its group, so the unequal diagonal blocks show each group's
    size on both sides; a group with channels on one side only has no block.
    """
    input_ids, filter_ids = np.asarray(input_ids), np.asarray(filter_ids)
    colors = _group_colors(num_groups)
    cmap = ListedColormap([(1, 1, 1, 1), *colors])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), constrained_layout=True)
    for ax, reorder in zip(axes, (False, True)):
        ins = input_ids[block_order(input_ids)] if reorder else input_ids
        outs = filter_ids[block_order(filter_ids)] if reorder else filter_ids
        image = np.where(outs[:, None] == ins[None, :], outs[:, None] + 1, 0)
        ax.imshow(image, cmap=cmap, vmin=0, vmax=num_groups, interpolation="nearest", aspect="auto")
        ax.set_xlabel(f"input channels ({len(ins)})")
        ax.set_ylabel(f"filters ({len(outs)})")
        if reorder:
            in_sizes = np.bincount(ins, minlength=num_groups)
            out_sizes = np.bincount(outs, minlength=num_groups)
            for edge in np.cumsum(in_sizes)[:-1]:
                ax.axvline(edge - 0.5, color="0.8", linewidth=0.5)
            for edge in np.cumsum(out_sizes)[:-1]:
                ax.axhline(edge - 0.5, color="0.8", linewidth=0.5)
            ax.set_title("reordered by group (group: inputs x filters)")
            handles = [plt.Rectangle((0, 0), 1, 1, color=colors[g]) for g in range(num_groups)]
            ax.legend(handles, [f"g{g}: {in_sizes[g]}x{out_sizes[g]}" for g in range(num_groups)],
                      loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        else:
            ax.set_title("channel order")
    density = float((filter_ids[:, None] == input_ids[None, :]).mean())
    fig.suptitle(f"{title}: mask, {density:.1%} of the dense connections kept")
    return _save(fig, path)


def plot_network_overview(records: Sequence[dict], path: Path) -> Path:
    """Heatmaps (layers x epochs) of input and filter channels moved, one glance for the whole network."""
    records = [r for r in records if not r["baseline"]] or list(records)  # nothing moves in a baseline
    layers = sorted({r["layer"] for r in records})
    epochs = sorted({r["epoch"] for r in records})
    col = {e: i for i, e in enumerate(epochs)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(layers) + 2), constrained_layout=True)
    for ax, side in zip(axes, ("inputs", "filters")):
        moved = np.full((len(layers), len(epochs)), np.nan)
        for r in records:
            channels = r["in_channels"] if side == "inputs" else r["out_channels"]
            moved[layers.index(r["layer"]), col[r["epoch"]]] = r[side]["moved"] / channels
        top = np.nanmax(moved) * 100 if np.any(moved > 0) else 1.0
        shown = ax.imshow(moved * 100, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=top)
        fig.colorbar(shown, ax=ax, label=f"% of {side} that changed group")
        step = max(1, len(epochs) // 20)
        ax.set_xticks(range(0, len(epochs), step), [epoch_label({"epoch": e}) for e in epochs][::step])
        ax.set_yticks(range(len(layers)), [str(l) for l in layers])
        ax.set_xlabel("epoch")
        ax.set_ylabel("FLGC layer")
        ax.set_title(f"{side} moved")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
