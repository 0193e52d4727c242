"""Matplotlib figures from exported arrays (no pyplot state: Figure objects
with the Agg canvas, so plotting works headless and in Ray workers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter

DPI = 100


def write_plots(plot_dir: Path, layers: list[int], values: dict[str, np.ndarray]) -> list[Path]:
    """Per layer and mode: histogram and scatter over dimensions. Per mode:
    all-layer heatmap and per-layer summary. With both modes: `_combined`."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for mode, array in values.items():
        for row, layer in enumerate(layers):
            written.append(_histogram(plot_dir / f"layer_{layer}_{mode}_histogram.png", array[row], layer, mode))
            written.append(_scatter(plot_dir / f"layer_{layer}_{mode}_scatter.png", array[row], layer, mode))
        written.append(_heatmap(plot_dir / f"all_layers_{mode}_heatmap.png", array, layers, mode))
        written.append(_summary(plot_dir / f"all_layers_{mode}_summary.png", array, layers, mode))
    if {"mean", "mean_abs"} <= values.keys():
        for row, layer in enumerate(layers):
            written.append(_combined(plot_dir / f"layer_{layer}_combined.png",
                                     values["mean_abs"][row], values["mean"][row], f"layer {layer}"))
        written.append(_combined(plot_dir / "all_layers_combined.png",
                                 values["mean_abs"].ravel(), values["mean"].ravel(), "all layers"))
    return written


# Margins in inches, the same in every figure: room for a title, tick labels of up to 8 characters
# and an axis label. Fixed margins draw a figure once; tight_layout drew it twice (1.4x the time).
MARGINS_INCHES = {"left": 0.85, "right": 0.25, "bottom": 0.6, "top": 0.4}
PNG_COMPRESS_LEVEL = 1  # zlib level: 1.4x faster than the default 6 for plots of flat colour, files ~1.2x


def _figure(width: float, height: float) -> Figure:
    """An empty Figure of `width` x `height` inches with the fixed margins."""
    m = MARGINS_INCHES
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=m["left"] / width, right=1 - m["right"] / width, bottom=m["bottom"] / height,
                        top=1 - m["top"] / height)
    return fig


def _plain_log_labels(axis) -> None:
    """Log-axis labels in plain text (1e-05, 2e-05; minor ones only where few decades show, as by
    default): matplotlib's default 10^x labels go through its TeX-like parser, a third of a figure's time."""
    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _save(fig: Figure, path: Path) -> Path:
    # An earlier export's plot, or a link planted at its name, is removed, never written through: the
    # file is created where nothing is ("x": O_EXCL, which also refuses a link made there meanwhile).
    path.unlink(missing_ok=True)
    with open(path, "xb") as handle:
        fig.savefig(handle, format="png", dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return path


def _histogram(path: Path, v: np.ndarray, layer: int, mode: str) -> Path:
    fig = _figure(7, 4)
    ax = fig.subplots()
    ax.hist(v, bins=100, histtype="stepfilled")  # one polygon, not 100 bars: a quarter less time per figure
    ax.set(title=f"layer {layer}: {mode} gradient per dimension", xlabel=mode, ylabel="dimensions")
    ax.set_yscale("log")
    _plain_log_labels(ax.yaxis)
    return _save(fig, path)


def _scatter(path: Path, v: np.ndarray, layer: int, mode: str) -> Path:
    fig = _figure(9, 4)
    ax = fig.subplots()
    ax.scatter(np.arange(v.size), v, s=2)
    ax.set(title=f"layer {layer}: {mode} gradient by dimension", xlabel="dimension", ylabel=mode)
    return _save(fig, path)


def _heatmap(path: Path, array: np.ndarray, layers: list[int], mode: str) -> Path:
    fig = _figure(10, max(3, 0.25 * len(layers) + 1))
    ax = fig.subplots()
    image = ax.imshow(array, aspect="auto", interpolation="nearest", cmap="RdBu_r" if (array < 0).any() else "viridis")
    ax.set(title=f"{mode} gradient, all layers", xlabel="dimension", ylabel="layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def _summary(path: Path, array: np.ndarray, layers: list[int], mode: str) -> Path:
    fig = _figure(8, 4)
    ax = fig.subplots()
    ax.plot(layers, np.abs(array).mean(axis=1), marker="o", label="mean over dimensions of |v|")
    ax.plot(layers, np.abs(array).max(axis=1), marker="x", label="max over dimensions of |v|")
    ax.set(title=f"{mode} gradient by layer", xlabel="layer", ylabel=f"|{mode}|")
    ax.set_yscale("log")
    _plain_log_labels(ax.yaxis)
    ax.legend()
    return _save(fig, path)


def _combined(path: Path, mean_abs: np.ndarray, mean: np.ndarray, title: str) -> Path:
    fig = _figure(6, 5)
    ax = fig.subplots()
    ax.scatter(mean_abs, mean, s=2)
    ax.set(title=f"{title}: signed mean vs mean |gradient|", xlabel="mean_abs", ylabel="mean")
    return _save(fig, path)


def write_compare_plots(plot_dir: Path, layers: list[int], mean_abs_a: np.ndarray, mean_abs_b: np.ndarray,
                        t_abs: np.ndarray, kind: str = "gradients") -> list[Path]:
    """`raygrad compare`: per layer, mean |x| in A against B (one point per dimension, log axes, the
    diagonal drawn); and Welch's t of |x| by layer (its spread over dimensions)."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if kind == "gradients" else f"_{kind}"
    written = [_a_vs_b(plot_dir / f"layer_{layer}_mean_abs_a_vs_b{suffix}.png", mean_abs_a[row], mean_abs_b[row],
                       f"layer {layer}: mean |{kind}| per dimension") for row, layer in enumerate(layers)]
    written.append(_t_by_layer(plot_dir / f"all_layers_welch_t_abs{suffix}.png", t_abs, layers, kind))
    return written


def _a_vs_b(path: Path, a: np.ndarray, b: np.ndarray, title: str) -> Path:
    fig = _figure(5.5, 5)
    ax = fig.subplots()
    positive = (a > 0) & (b > 0)
    ax.scatter(b[positive], a[positive], s=2)
    if positive.any():
        low, high = min(a[positive].min(), b[positive].min()), max(a[positive].max(), b[positive].max())
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8, label="A = B")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_labels(ax.xaxis)
        _plain_log_labels(ax.yaxis)
        ax.legend()
    ax.set(title=title, xlabel="RUN_B", ylabel="RUN_A")
    return _save(fig, path)


def _t_by_layer(path: Path, t: np.ndarray, layers: list[int], kind: str) -> Path:
    fig = _figure(8, 4)
    ax = fig.subplots()
    ax.plot(layers, t.max(axis=1), marker="^", label="max (most specific to A)")
    ax.plot(layers, np.percentile(t, 50, axis=1), marker="o", label="median")
    ax.plot(layers, t.min(axis=1), marker="v", label="min (most specific to B)")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(title=f"Welch's t of |{kind}|, A against B, over dimensions", xlabel="layer", ylabel="t")
    ax.legend()
    return _save(fig, path)


def histogram_png(values: np.ndarray, title: str, xlabel: str, marked: np.ndarray = ()) -> bytes:
    """One layer's values over its features as PNG bytes (the HTML report inlines them): log counts, and
    the `marked` values (the features the page lists) as red ticks under the bars. One filled outline
    rather than a bar per bin, and fixed margins: a page of many layers draws in a fraction of the time."""
    import io

    values = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(values[np.isfinite(values)], bins=80)
    fig = Figure(figsize=(6, 2.2))
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.22, top=0.88)
    ax = fig.subplots()
    ax.stairs(counts, edges, fill=True, baseline=0.5, color="#57606a")  # 0.5: below a count of 1 on log axes
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5, top=max(counts.max(), 1) * 1.5)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda count, _: f"{count:g}"))  # 1, 10, 100, not 10^0
    ax.yaxis.set_minor_formatter(NullFormatter())
    for value in np.asarray(marked, dtype=np.float64):
        ax.axvline(value, ymax=0.07, color="#cf222e", linewidth=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8, labelpad=1)
    ax.set_ylabel("features", fontsize=8)
    ax.tick_params(labelsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})  # no matplotlib URL in the page
    return buffer.getvalue()
