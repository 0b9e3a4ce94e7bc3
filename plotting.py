"""Plots as PNG files: matplotlib without pyplot (no global state), each file written
atomically (a temporary name, then renamed), so a killed run never leaves half a PNG."""
from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path


def drawn(fn):
    """A plot that is skipped with one line saying so where matplotlib is not installed (some
    GPU images lack it): a long run's results must not be lost to its picture."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            path = inspect.signature(fn).bind(*args, **kwargs).arguments.get("path")
            print(f"warning: matplotlib is not installed (pip install -r requirements.txt): {path} not drawn",
                  file=sys.stderr)
            return None
        return fn(*args, **kwargs)
    return wrapper


def figure(width: float, height: float):
    # imported here: matplotlib takes ~0.5 s to import, and most runs plot nothing
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    tmp.replace(path)
    return path


@drawn
def plot_lines(path, x, series: dict, xlabel: str, ylabel: str, title: str = "",
               hlines: dict | None = None, styles: dict | None = None) -> Path:
    """A line plot. `x` is shared by every series; with x=None each series is its own
    (xs, ys) pair. `hlines` maps a label to a horizontal reference line; `styles` maps a
    label to extra `ax.plot` keywords (colour, linestyle, ...)."""
    fig = figure(6, 4)
    ax = fig.subplots()
    for label, ys in series.items():
        xs, ys = ys if x is None else (x, ys)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label,
                **(styles or {}).get(label, {}))
    for label, yv in (hlines or {}).items():
        ax.axhline(yv, linestyle="--", color="grey", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if len(series) + len(hlines or {}) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


@drawn
def save_weight_grid(weight, image_shape, path, class_names=None, ncol: int = 10) -> Path:
    """The rows of `weight` (K × C·H·W, e.g. a linear model's class weight vectors: orthogonal
    projection's recovered perturbations) as K images, each min-max scaled to [0,1] on its own,
    `ncol` per row, titled with `class_names`."""
    k = weight.shape[0]
    imgs = weight.detach().float().cpu().view(k, *image_shape)
    lo = imgs.flatten(1).min(1)[0].view(-1, 1, 1, 1)
    hi = imgs.flatten(1).max(1)[0].view(-1, 1, 1, 1)
    imgs = (imgs - lo) / (hi - lo).clamp_min(1e-12)
    cols = min(ncol, k)
    rows = -(-k // cols)
    fig = figure(1.1 * cols, 1.25 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.set_axis_off()
        if i < k:
            ax.imshow(imgs[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            name = class_names[i] if class_names and i < len(class_names) else str(i)
            ax.set_title(str(name)[:12], fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)
