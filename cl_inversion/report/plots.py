"""PNG plots of results: accuracy-matrix heatmap and accuracy-after-each-task curves.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, safe in SLURM jobs and threads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def accuracy_heatmap(matrix: Sequence[Sequence[float]], path: str | Path, title: str = "",
                     std: Sequence[Sequence[float]] | None = None) -> Path:
    """Heatmap of A[i][j] (row: after training task i, column: evaluated on task j), values annotated."""
    import numpy as np

    n_rows = len(matrix)
    n_cols = max(len(row) for row in matrix)
    grid = np.full((n_rows, n_cols), np.nan)
    for i, row in enumerate(matrix):
        grid[i, : len(row)] = row
    size = max(3.5, 0.6 * n_cols + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    small = n_cols > 10
    for i in range(n_rows):
        for j in range(len(matrix[i])):
            text = f"{grid[i, j]:.0f}" if small else f"{grid[i, j]:.1f}"
            if std is not None and not small:
                text += f"\n±{std[i][j]:.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7 if small else 8,
                    color="white" if grid[i, j] < 60 else "black")
    ax.set_xticks(range(n_cols))
    ax.set_yticks(range(n_rows))
    ax.set_xticklabels([str(j + 1) for j in range(n_cols)])
    ax.set_yticklabels([str(i + 1) for i in range(n_rows)])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def accuracy_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                    title: str = "") -> Path:
    """Average accuracy over seen tasks after each task, one line per label (mean, shaded ± std)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")]
    for k, (label, (mean, std)) in enumerate(curves.items()):
        x = list(range(1, len(mean) + 1))
        marker, line = styles[k % len(styles)]
        (drawn,) = ax.plot(x, mean, marker=marker, linestyle=line, label=label)
        if any(s > 0 for s in std):
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                            color=drawn.get_color())
    n = max((len(mean) for mean, _ in curves.values()), default=1)
    ax.set_xticks(range(1, n + 1))
    ax.set_ylim(0, 100)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy on seen tasks (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
