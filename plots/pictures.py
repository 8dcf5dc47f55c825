"""Token-selection pictures: for a few fixed samples, the image the model saw with the patches that reached the LLM
kept bright and the others dimmed; one panel per method and budget."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from plots.curves import REFERENCE, save  # noqa: E402
from plots.data import Results  # noqa: E402

DIM = 0.25  # brightness of the patches that were dropped


def selection_image(image: np.ndarray, grid: tuple[int, int], kept: list[int] | None) -> np.ndarray:
    """(H, W, 3) uint8 -> the same with every patch not in `kept` dimmed (None: all kept)."""
    if kept is None:
        return image
    rows, cols = grid
    h, w = image.shape[0] // rows, image.shape[1] // cols
    keep = np.zeros(rows * cols, bool)
    keep[[i for i in kept if 0 <= i < rows * cols]] = True
    mask = np.kron(keep.reshape(rows, cols), np.ones((h, w), bool))  # (rows h, cols w)
    factor = np.full(image.shape[:2], DIM)
    factor[: mask.shape[0], : mask.shape[1]][mask] = 1.0
    return (image * factor[..., None]).astype(np.uint8)


def selection_pictures(res: Results, out: Path, max_docs: int = 2) -> list[Path]:
    """One PNG per (task, picture doc): rows = methods, columns = budgets."""
    written = []
    for (task, doc_id), (png, meta) in sorted(res.pictures.items()):
        if doc_id >= max_docs:
            continue
        entries = {(m, b): k for (t, m, b, d), k in res.kept.items() if t == task and d == doc_id and m != REFERENCE}
        if not entries:
            continue
        methods = sorted({m for m, _ in entries})
        order = dict(zip(res.summary["budget"], res.summary["budget_tokens"], strict=True))  # the store's numbers
        budgets = sorted({b for _, b in entries}, key=lambda b: (order.get(b, float("inf")), b))
        try:
            image = np.asarray(plt.imread(png))
            grid = tuple(meta["grid"])
        except (OSError, SyntaxError, ValueError, KeyError, TypeError) as e:  # PIL reports a bad PNG as SyntaxError
            print(f"warning: {png} cannot be read as the picture of {task} doc {doc_id} ({e}): skipped",
                  file=sys.stderr)
            continue
        image = (image[..., :3] * 255).astype(np.uint8) if image.dtype != np.uint8 else image[..., :3]
        fig, axes = plt.subplots(len(methods), len(budgets) + 1, squeeze=False,
                                 figsize=(1.9 * (len(budgets) + 1), 1.9 * len(methods) + 0.8), dpi=110)
        for r, method in enumerate(methods):
            axes[r][0].imshow(image, interpolation="nearest")
            axes[r][0].set_ylabel(method, fontsize=9)
            axes[r][0].set_title("input" if r == 0 else "", fontsize=8)
            for c, budget in enumerate(budgets, start=1):
                ax = axes[r][c]
                if (method, budget) not in entries:
                    ax.axis("off")
                    continue
                kept = entries[(method, budget)]
                ax.imshow(selection_image(image, grid, kept), interpolation="nearest")
                n = grid[0] * grid[1] if kept is None else len([i for i in kept if i >= 0])
                ax.set_title(f"budget {budget}: {n} kept", fontsize=8)
                _outline(ax, image.shape, grid, kept)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        question = " ".join(meta["question"].split())
        fig.suptitle(f"{task}, doc {doc_id}: " + "\n".join(textwrap.wrap(question, 90)[:2]), fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))  # the top 0.6 inch for the title
        written.append(save(fig, out / f"selection_{task}_doc{doc_id}.png"))
    return written


def _outline(ax, shape: tuple, grid: tuple[int, int], kept: list[int] | None) -> None:
    """Thin outlines around kept patches (readable when the image itself is dark)."""
    if kept is None:
        return
    rows, cols = grid
    h, w = shape[0] / rows, shape[1] / cols
    for i in kept:
        if 0 <= i < rows * cols:
            ax.add_patch(Rectangle(((i % cols) * w - 0.5, (i // cols) * h - 0.5), w, h, fill=False, edgecolor="white",
                                   linewidth=0.4))
