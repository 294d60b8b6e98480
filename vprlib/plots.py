"""Matplotlib figures for the notebooks: dataset statistics, batches, training, retrieval.

Every function returns a `matplotlib.figure.Figure` with a title and axis labels and works
under the headless Agg backend. matplotlib is imported inside the functions so `import vprlib`
never needs it. In a notebook assign the result (`fig = plots.plot_years(df)`) so the inline
backend shows it once; `save_figure(fig, "../figures/x.png")` writes it atomically.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import atomic_write_bytes
from .optional import needs
from .transforms import IMAGENET_MEAN, IMAGENET_STD

CORRECT_COLOUR = "#2ca02c"  # green frame: a true positive
WRONG_COLOUR = "#d62728"  # red frame: not a positive
QUERY_COLOUR = "#1f77b4"  # blue frame: the query
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _pyplot():
    with needs("vprlib.plots (matplotlib)", "matplotlib"):
        import matplotlib.pyplot as plt

    return plt


def _integer_y(ax) -> None:
    """Counts are whole numbers: no 0.5 ticks on the y axis."""
    with needs("vprlib.plots (matplotlib)", "matplotlib"):
        from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _require_columns(df: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"{where}: DataFrame lacks column(s) {missing}; has {list(df.columns)}")


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write `fig` as PNG to `path` (folders created, atomic replace); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG: path must end in .png, got {str(path)!r}")
    atomic_write_bytes(path, figure_png(fig, dpi=dpi))
    return path


def figure_png(fig, dpi: int = 100) -> bytes:
    """The PNG bytes of `fig` (used by the widgets to show a figure without a live backend)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


# ---------------------------------------------------------------- dataset statistics


def plot_images_per_place(df: pd.DataFrame):
    """Histogram: how many places have 4, 5, ..., 20 images."""
    _require_columns(df, ["place"], "plot_images_per_place")
    counts = df.groupby("place").size()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    lo, hi = int(counts.min()), int(counts.max())
    ax.hist(counts, bins=np.arange(lo - 0.5, hi + 1.5), color=QUERY_COLOUR, edgecolor="white")
    ax.set_title(f"Images per place ({len(counts):,} places, {len(df):,} images)")
    ax.set_xlabel("images per place")
    ax.set_ylabel("number of places")
    _integer_y(ax)
    ax.set_xticks(range(lo, hi + 1))
    fig.tight_layout()
    return fig


def plot_years(df: pd.DataFrame):
    """Bar chart: images per capture year."""
    _require_columns(df, ["year"], "plot_years")
    counts = df["year"].value_counts().sort_index()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(counts.index.astype(int), counts.to_numpy(), color=QUERY_COLOUR)
    ax.set_title("Images per year of capture")
    ax.set_xlabel("year")
    ax.set_ylabel("number of images")
    _integer_y(ax)
    ax.set_xticks(counts.index.astype(int))
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    return fig


def plot_months(df: pd.DataFrame):
    """Bar chart: images per calendar month (all twelve shown, empty months at zero)."""
    _require_columns(df, ["month"], "plot_months")
    counts = df["month"].value_counts().reindex(range(1, 13), fill_value=0)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(1, 13), counts.to_numpy(), color=QUERY_COLOUR)
    ax.set_title("Images per month of capture")
    ax.set_xlabel("month")
    ax.set_ylabel("number of images")
    _integer_y(ax)
    ax.set_xticks(range(1, 13), MONTHS)
    fig.tight_layout()
    return fig


def plot_headings(df: pd.DataFrame, bins: int = 36):
    """Polar histogram of camera headings (northdeg % 360; 0 = north, clockwise)."""
    _require_columns(df, ["northdeg"], "plot_headings")
    deg = df["northdeg"].to_numpy(dtype=float) % 360
    counts, edges = np.histogram(deg, bins=bins, range=(0, 360))
    plt = _pyplot()
    fig = plt.figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot(projection="polar")
    ax.set_theta_zero_location("N")
    ax.set_theta_direction(-1)
    width = np.deg2rad(360 / bins)
    ax.bar(
        np.deg2rad(edges[:-1]),
        counts,
        width=width,
        align="edge",
        color=QUERY_COLOUR,
        edgecolor="white",
        linewidth=0.5,
        alpha=0.85,
    )
    ax.set_title("Camera headings (degrees from north)", pad=20)
    ax.set_xlabel("heading")
    ax.set_ylabel("images", labelpad=28)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- images


def _to_hwc_uint8(image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """[3,H,W] uint8 or ImageNet-normalised float (torch or numpy) -> [H,W,3] uint8."""
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"expected an image [3,H,W], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.transpose(1, 2, 0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"expected uint8 or float images, got {arr.dtype}")
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    pixels = (arr.astype(np.float32) * s + m) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def show_batch(images, labels, max_places: int | None = 8):
    """A P x K grid: one row per place, labelled with its place id.

    `images` is [P,K,3,H,W] uint8, or float already ImageNet-normalised (undone for display).
    `labels` is [P,K] or [P] (the place id of each row).
    """
    shape = tuple(images.shape)
    if len(shape) != 5 or shape[2] != 3:
        raise ValueError(f"show_batch: images must be [P,K,3,H,W], got {shape}")
    p, k = shape[:2]
    lab = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if lab.shape not in ((p, k), (p,)):
        raise ValueError(f"show_batch: labels must be [P,K] or [P] = {(p, k)}, got {lab.shape}")
    row_labels = lab[:, 0] if lab.ndim == 2 else lab
    rows = p if max_places is None else min(p, max_places)
    plt = _pyplot()
    fig, axes = plt.subplots(rows, k, figsize=(1.8 * k, 1.6 * rows), squeeze=False)
    for i in range(rows):
        for j in range(k):
            ax = axes[i, j]
            ax.imshow(_to_hwc_uint8(images[i, j]))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"place {int(row_labels[i])}", fontsize=8)
            if i == rows - 1:
                ax.set_xlabel(f"image {j + 1}", fontsize=8)
    shown = f" (first {rows} shown)" if rows < p else ""
    fig.suptitle(f"Training batch: {p} places x {k} images{shown}")
    fig.tight_layout()
    return fig


def _load_rgb(path: str | os.PathLike) -> np.ndarray:
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@contextlib.contextmanager
def closed_on_error(fig) -> Iterator[None]:
    """Close `fig` if filling it fails (a missing image, say), so no half-drawn figure is left
    open to show up under a later notebook cell."""
    try:
        yield
    except BaseException:
        _pyplot().close(fig)
        raise


def _frame(ax, colour: str, width: float = 5.0) -> None:
    """Colour the four spines of an image axis: the green/red/blue frame."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def _retrieval_row(axes, query_path, topk_paths, correct, distances, query_label="query"):
    axes[0].imshow(_load_rgb(query_path))
    _frame(axes[0], QUERY_COLOUR)
    axes[0].set_title(query_label, fontsize=9)
    for rank, (ax, path, ok, dist) in enumerate(
        zip(axes[1:], topk_paths, correct, distances, strict=True), start=1
    ):
        ax.imshow(_load_rgb(path))
        _frame(ax, CORRECT_COLOUR if ok else WRONG_COLOUR)
        ax.set_title(f"#{rank} {'ok' if ok else 'wrong'}  d={float(dist):.3f}", fontsize=9)


def _check_retrieval_args(topk_paths, correct, distances) -> None:
    if not (len(topk_paths) == len(correct) == len(distances)):
        raise ValueError(
            f"plot_retrieval: topk_paths ({len(topk_paths)}), correct ({len(correct)}) and "
            f"distances ({len(distances)}) must have the same length K"
        )
    if len(topk_paths) == 0:
        raise ValueError("plot_retrieval: need at least one retrieved image (K >= 1)")


def plot_retrieval(
    query_path: str | os.PathLike,
    topk_paths: Sequence[str | os.PathLike],
    correct: Sequence[bool],
    distances: Sequence[float],
    title: str | None = None,
):
    """Query (blue frame) beside its top-K matches (green = positive, red = not), K+1 panels."""
    _check_retrieval_args(topk_paths, correct, distances)
    k = len(topk_paths)
    plt = _pyplot()
    fig, axes = plt.subplots(1, k + 1, figsize=(2.4 * (k + 1), 2.6), squeeze=False)
    with closed_on_error(fig):
        _retrieval_row(axes[0], query_path, topk_paths, correct, distances)
    axes[0, 0].set_xlabel("query image", fontsize=8)
    axes[0, 1].set_xlabel(
        "retrieved, nearest first (d = squared L2 descriptor distance)", fontsize=8, loc="left"
    )
    fig.suptitle(title or f"Top-{k} retrieval: green = positive, red = wrong place")
    fig.tight_layout()
    return fig


def plot_retrieval_grid(results, query_indices: Sequence[int], k: int = 5):
    """Several queries of an EvalResults, one row each (query + top-K with frames)."""
    kmax = results.predictions.shape[1]
    if not 1 <= k <= kmax:
        raise ValueError(f"plot_retrieval_grid: k must be in 1..{kmax}, got {k}")
    if len(query_indices) == 0:
        raise ValueError("plot_retrieval_grid: query_indices is empty")
    plt = _pyplot()
    n = len(query_indices)
    fig, axes = plt.subplots(n, k + 1, figsize=(2.2 * (k + 1), 2.4 * n), squeeze=False)
    with closed_on_error(fig):
        for row, q in enumerate(query_indices):
            preds = results.predictions[q, :k]
            _retrieval_row(
                axes[row],
                results.query_paths[q],
                [results.db_paths[i] for i in preds],
                results.correct[q, :k],
                results.distances[q, :k],
                query_label=f"query {q}",
            )
    fig.suptitle(
        f"{results.benchmark}: queries (blue) and their top-{k}, green = positive (by the "
        "benchmark's ground truth), red = wrong; d = squared L2 descriptor distance"
    )
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- training and evaluation


def plot_history(history: pd.DataFrame, recall_unit: str = "fraction"):
    """Training curves per epoch: loss, batch accuracy, learning rate and validation recall.

    The `epoch` column is 0-based as `fit` writes it and is drawn 1-based (epoch 1 = first).

    Plots each of `loss`, `b_acc`, `lr` that is present, plus every column whose name
    contains "R@" (validation recall, drawn in percent). `recall_unit`: "fraction" (what
    `fit` writes, 0..1) or "percent" (a table of your own in 0..100).
    """
    if recall_unit not in ("fraction", "percent"):
        raise ValueError(f"recall_unit must be 'fraction' or 'percent', got {recall_unit!r}")
    if len(history) == 0:
        raise ValueError("plot_history: the history has no rows (no epoch finished)")
    # fit writes 0-based epochs; show them 1-based like its progress bar ("epoch 1/2").
    x = (
        history["epoch"].to_numpy() + 1
        if "epoch" in history.columns
        else np.arange(1, len(history) + 1)
    )
    panels = [(c, label) for c, label in _HISTORY_PANELS if c in history.columns]
    recall_cols = [c for c in history.columns if "R@" in str(c)]
    if not panels and not recall_cols:
        raise KeyError(
            "plot_history: none of the columns loss, b_acc, lr or any '...R@K' column found; "
            f"has {list(history.columns)}"
        )
    n = len(panels) + (1 if recall_cols else 0)
    plt = _pyplot()
    with needs("vprlib.plots (matplotlib)", "matplotlib"):
        from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False)
    for ax, (col, label) in zip(axes[0], panels, strict=False):
        ax.plot(x, history[col].to_numpy(dtype=float), marker="o")
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(col)
        if col == "lr":  # plain numbers (0.05), not an offset like "5.0 + 1e-2"; from 0
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.3g}"))
            ax.set_ylim(bottom=0)
        if col == "b_acc":  # a share: the full 0..1 range, so a flat line is not magnified
            ax.set_ylim(-0.02, 1.02)
    if recall_cols:
        ax = axes[0, -1]
        for col in recall_cols:
            values = history[col].to_numpy(dtype=float)
            if recall_unit == "fraction":
                if np.nanmax(values, initial=0.0) > 1.0:
                    raise ValueError(
                        f"plot_history: column {col!r} has values above 1, so it is not a "
                        "fraction; pass recall_unit='percent'"
                    )
                values = values * 100.0
            ax.plot(x, values, marker="o", label=str(col))
        ax.set_title("validation recall")
        ax.set_xlabel("epoch")
        ax.set_ylabel("recall (%)")
        ax.legend(fontsize=8, loc="best")
    for ax in axes[0]:
        if len(x) <= 20:
            ax.set_xticks(x)
    fig.suptitle("Training history")
    fig.tight_layout()
    return fig


_HISTORY_PANELS = (
    ("loss", "training loss (Multi-Similarity)"),
    ("b_acc", "batch accuracy (share of easy images)"),
    ("lr", "learning rate (end of epoch)"),
)


def plot_recalls(recalls: Mapping[str, Mapping[int, float]], title: str = "Recall@K"):
    """Recall@K curves, one line per model/benchmark name; fractions shown as percent."""
    if not recalls:
        raise ValueError("plot_recalls: no curves given")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    all_ks: set[int] = set()
    for name, curve in recalls.items():
        if not curve:
            raise ValueError(f"plot_recalls: curve {name!r} is empty")
        ks = sorted(int(k) for k in curve)
        values = [100.0 * float(curve[k]) for k in sorted(curve, key=int)]
        if any(not 0.0 <= v <= 100.0 for v in values):
            raise ValueError(f"plot_recalls: {name!r} has recalls outside [0, 1]: {dict(curve)}")
        ax.plot(ks, values, marker="o", label=str(name))
        all_ks.update(ks)
    ax.set_xticks(sorted(all_ks))
    ax.set_ylim(0, 102)
    ax.set_title(title)
    ax.set_xlabel("K (number of retrieved database images)")
    ax.set_ylabel("recall@K (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


# Where a point's label may go, in points from the point, tried in this order.
_LABEL_OFFSETS = [(6, 5, "left"), (6, -12, "left"), (-6, 5, "right"), (-6, -12, "right"),
                  (6, 17, "left"), (6, -24, "left"), (-6, 17, "right"), (-6, -24, "right")]  # fmt: skip


def _label_points(fig, ax, xs, ys, labels) -> None:
    """Annotate each point with its label at the first offset whose text overlaps no label
    placed before it (nor, where it can, another point): close points stay readable."""
    fig.tight_layout()  # the axes' final place, so the measured texts are where they end up
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    dots = [ax.transData.transform((x, y)) for x, y in zip(xs, ys, strict=True)]
    placed = []
    for i in np.argsort(-np.asarray(ys, dtype=float), kind="stable"):
        best = None
        for dx, dy, align in _LABEL_OFFSETS:
            text = ax.annotate(
                labels[i], (xs[i], ys[i]), textcoords="offset points", xytext=(dx, dy), ha=align
            )
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            clashes = sum(box.overlaps(other) for other in placed)
            covers = sum(box.contains(*dot) for j, dot in enumerate(dots) if j != i)
            if best is None or (clashes, covers) < best[0]:
                if best is not None:
                    best[1].remove()
                best = ((clashes, covers), text, box)
            else:
                text.remove()
            if best[0] == (0, 0):
                break
        placed.append(best[2])


def plot_size_vs_recall(
    table: pd.DataFrame,
    size_col: str = "descriptor_dim",
    recall_cols: Sequence[str] | None = None,
    title: str | None = None,
):
    """Descriptor size (log scale) against recall, one line per benchmark column.

    `recall_cols` defaults to the columns whose name ends with "R@1" (values in percent; not
    R@10 or R@15). The axis and default title name the K of the columns' "R@K" endings.
    """
    _require_columns(table, [size_col], "plot_size_vs_recall")
    cols = (
        list(recall_cols)
        if recall_cols is not None
        else [c for c in table if str(c).rstrip().endswith("R@1")]
    )
    if not cols:
        raise KeyError(f"plot_size_vs_recall: no recall columns (with 'R@1'); has {list(table)}")
    _require_columns(table, cols, "plot_size_vs_recall")
    ordered = table.sort_values(size_col)
    sizes = ordered[size_col].to_numpy(dtype=float)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for col in cols:
        ax.plot(sizes, ordered[col].to_numpy(dtype=float), marker="o", label=str(col))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(int(s)) for s in sizes])
    ax.minorticks_off()
    endings = [re.search(r"R@(\d+)\s*$", str(c)) for c in cols]
    ks = {m[1] for m in endings if m}
    recall = f"recall@{ks.pop()}" if len(ks) == 1 and all(endings) else "recall"
    ax.set_title(title if title is not None else f"Descriptor size vs {recall}")
    ax.set_xlabel("descriptor dimension (log scale)")
    ax.set_ylabel(f"{recall} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_compare(
    results_df: pd.DataFrame,
    name_col: str = "aggregator",
    recall_cols: Sequence[str] = ("R@1", "R@5", "R@10"),
    title: str | None = None,
):
    """Aggregators side by side: grouped recall bars, and R@1 against training time and size.

    Expects a row per model with `name_col`, the recall columns (percent) and optionally
    `descriptor_dim` and `train_s` for the second panel.
    """
    _require_columns(results_df, [name_col, *recall_cols], "plot_compare")
    if len(results_df) == 0:
        raise ValueError("plot_compare: no rows")
    names = results_df[name_col].astype(str).tolist()
    extra = "train_s" in results_df.columns
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(11 if extra else 6.5, 4), squeeze=False)
    ax = axes[0, 0]
    x = np.arange(len(names))
    width = 0.8 / len(recall_cols)
    for i, col in enumerate(recall_cols):
        values = results_df[col].to_numpy(dtype=float)
        bars = ax.bar(x + (i - (len(recall_cols) - 1) / 2) * width, values, width, label=col)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 125)  # headroom above 100 % for the legend: it never hides a bar
    ax.set_yticks(range(0, 101, 20))
    ax.set_title("Recall by aggregator")
    ax.set_xlabel("aggregator")
    ax.set_ylabel("recall (%)")
    ax.legend(fontsize=8, loc="upper center", ncol=len(recall_cols), frameon=False)
    if extra:
        ax = axes[0, 1]
        r1 = results_df[recall_cols[0]].to_numpy(dtype=float)
        secs = results_df["train_s"].to_numpy(dtype=float)
        ax.scatter(secs, r1, s=60, color=QUERY_COLOUR)
        has_dim = "descriptor_dim" in results_df.columns
        labels = [
            f"{name} ({int(results_df['descriptor_dim'].iloc[i])}-d)" if has_dim else name
            for i, name in enumerate(names)
        ]
        ax.set_title(f"{recall_cols[0]} against training time")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel(f"{recall_cols[0]} (%)")
        ax.margins(x=0.25, y=0.15)
        ax.grid(alpha=0.3)
        _label_points(fig, ax, secs, r1, labels)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_failure_distances(metres, bins: int = 20, threshold_m: float | None = 25.0):
    """Histogram of how far (metres) the wrong top-1 matches are from their queries.

    NaN entries (no coordinates) are left out; with no finite value the panel says so.
    `threshold_m`: the benchmark's positive radius, drawn as a dashed line (None: no line).
    """
    values = np.asarray(metres, dtype=float).reshape(-1)
    finite = values[np.isfinite(values)]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if finite.size:
        ax.hist(finite, bins=bins, color=WRONG_COLOUR, edgecolor="white")
        if threshold_m is not None and np.isfinite(threshold_m):
            label = f"{threshold_m:g} m threshold"
            ax.axvline(threshold_m, color="black", linestyle="--", linewidth=1, label=label)
            ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no failures with known coordinates", ha="center", transform=ax.transAxes)
    counted = f"{finite.size} failures"
    if finite.size < values.size:
        counted = f"{finite.size} of {values.size} failures have coordinates"
    ax.set_title(f"Wrong top-1 matches: distance to the query ({counted})")
    ax.set_xlabel("distance between query and wrong top-1 (m)")
    ax.set_ylabel("number of queries")
    _integer_y(ax)
    fig.tight_layout()
    return fig
