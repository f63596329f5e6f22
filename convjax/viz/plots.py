"""Figures: learning curves (accuracy and loss, train vs validation), image grids, map panels."""

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from convjax import files  # noqa: E402


def smooth(points, factor: float):
  """Exponential moving average, as Chollet smooths noisy curves (factor 0.8)."""
  out = []
  for p in points:
    out.append(out[-1] * factor + p * (1 - factor) if out else p)
  return out


def learning_curves(history: list, path: str, smoothing: float = 0.0, title: str = "") -> None:
  """Writes a PNG with accuracy and loss panels; `smoothing` > 0 adds EMA lines."""
  rows = [r for r in history if "epoch" in r]  # the test record has no epoch
  epochs = [r["epoch"] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
    for split, style in (("train", "o"), ("val", "-")):
      values = [r[f"{split}_{metric}"] for r in rows]
      label = "training" if split == "train" else "validation"
      ax.plot(epochs, values, style, label=label, alpha=0.35 if smoothing else 1.0)
      if smoothing:
        ax.plot(
          epochs,
          smooth(values, smoothing),
          style[0] + "-" if split == "train" else "-",
          label=f"{label} (EMA {smoothing})",
        )
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.set_title(f"{title} {metric}".strip())
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)


def image_grid(images, path: str, cols: int = 4, titles=None, size: float = 2.5) -> None:
  """Writes a PNG of images (N, H, W, C) in [0, 255] or [0, 1], `cols` to a row."""
  images = np.asarray(images, np.float32)
  if images.max() > 1.0:
    images = images / 255.0
  rows = -(-len(images) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i < len(images):
      image = np.clip(images[i], 0, 1)
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
      if titles:
        ax.set_title(titles[i], fontsize=9)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)


def bar_chart(labels, values, path: str, ylabel: str = "", title: str = "") -> None:
  """Writes a PNG bar chart with each bar's value printed on it."""
  fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 4))
  bars = ax.bar(range(len(labels)), values, color="tab:blue")
  for bar, value in zip(bars, values, strict=True):
    ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.3f}", ha="center", va="bottom")
  ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, max(1.0, max(values) * 1.1))
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)


def map_panels(path: str, image, panels) -> None:
  """Writes a PNG: the image, then one panel per (title, 2-D map or RGB image, cmap[, imshow
  options such as vmin/vmax]); a 2-D map gets a colour bar."""
  image = np.asarray(image)
  fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.4 * (len(panels) + 1), 3.4))
  axes[0].imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None)
  axes[0].set_title("image")
  for ax, (title, m, cmap, *options) in zip(axes[1:], panels, strict=True):
    shown = ax.imshow(m, cmap=cmap, **(options[0] if options else {}))
    if np.ndim(m) == 2:
      fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
    ax.set_title(title, fontsize=9)
  for ax in axes:
    ax.axis("off")
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)


def channel_grid_figure(grid, path: str, title: str) -> None:
  """Writes a PNG of a channel grid (activations.channel_grid), viridis, one pixel per value."""
  fig = plt.figure(figsize=(grid.shape[1] / 60 + 1, grid.shape[0] / 60 + 1))
  plt.imshow(grid, cmap="viridis", aspect="auto")
  plt.title(title)
  plt.axis("off")
  files.save_figure(fig, path, dpi=100)


def confusion_matrix(matrix, classes, path: str, title: str = "") -> None:
  """Writes a PNG of a confusion matrix (rows: true class, columns: predicted), each cell's
  count printed where there are at most 30 classes."""
  matrix = np.asarray(matrix)
  k = len(classes)
  side = min(max(4.0, 0.55 * k + 2), 40.0)
  fig, ax = plt.subplots(figsize=(side + 1, side))
  shown = ax.imshow(matrix, cmap="Blues")
  fig.colorbar(shown, ax=ax, fraction=0.046)
  if k <= 30:
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    high = matrix.max() / 2 if matrix.size else 0
    for i in range(k):
      for j in range(k):
        ax.text(
          j,
          i,
          str(int(matrix[i, j])),
          ha="center",
          va="center",
          fontsize=8,
          color="white" if matrix[i, j] > high else "black",
        )
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)


def metrics_table(values, rows, columns, path: str, lower_is_better) -> None:
  """Writes a PNG of a methods x metrics table: each value printed, each column coloured by
  rank (green: the best of the column, by `lower_is_better` per column)."""
  values = np.asarray(values, np.float64)
  ranks = np.zeros_like(values)
  for j, lower in enumerate(lower_is_better):
    order = np.argsort(values[:, j] if lower else -values[:, j], kind="stable")
    ranks[order, j] = np.linspace(0, 1, len(order)) if len(order) > 1 else 0
  fig, ax = plt.subplots(figsize=(2.2 * len(columns) + 2.5, 0.45 * len(rows) + 1.5))
  ax.imshow(ranks, cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto")
  ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
  ax.set_yticks(range(len(rows)), rows)
  for i in range(len(rows)):
    for j in range(len(columns)):
      ax.text(j, i, f"{values[i, j]:.4g}", ha="center", va="center", fontsize=8)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
