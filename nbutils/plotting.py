"""One plot style for the whole book, and the plots every chapter draws."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from nbutils.metrics import image_auroc, roc

PALETTE = "colorblind"


def set_style() -> None:
    """Seaborn's whitegrid with the colour-blind palette and readable sizes. Inline figures at
    80 dpi keep executed pages lean (the pipeline flags a page over 400 KB); saved files get 150."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", palette=PALETTE, context="notebook")
    plt.rcParams.update({"figure.dpi": 80, "savefig.dpi": 150, "figure.figsize": (6, 4),
                         "axes.titlesize": "medium", "image.cmap": "gray"})


def plot_roc_curves(scores: dict[str, np.ndarray], labels: np.ndarray, ax=None, title: str = ""):
    """ROC curves of several scores on the same test set, AUROC in the legend."""
    ax = ax or plt.gca()
    for name, s in scores.items():
        fpr, tpr = roc(s, labels)
        ax.plot(fpr, tpr, label=f"{name} ({image_auroc(s, labels):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    ax.legend(title="AUROC", fontsize="small")
    return ax


def plot_score_histogram(scores: np.ndarray, labels: np.ndarray, ax=None, title: str = "",
                         bins: int = 40, log: bool = False):
    """Overlaid score histograms of normal (0) and anomalous (1) test images."""
    ax = ax or plt.gca()
    scores = np.asarray(scores)
    edges = np.histogram_bin_edges(scores, bins=bins)
    for value, name in ((0, "normal"), (1, "anomaly")):
        ax.hist(scores[labels == value], bins=edges, alpha=0.55, density=True, label=name,
                log=log)
    ax.set(xlabel="anomaly score", ylabel="density", title=title)
    ax.legend()
    return ax


def show_images(images: np.ndarray, ncols: int = 8, titles: list[str] | None = None,
                scale: float = 1.2, cmap: str = "gray"):
    """A grid of (N, C, H, W) images in [0, 1]."""
    images = np.asarray(images)
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * scale, nrows * scale), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i].transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img.clip(0, 1), cmap=cmap,
                      vmin=0, vmax=1, interpolation="nearest")  # pixels as they are; small PNGs
            if titles:
                ax.set_title(titles[i], fontsize="small")
    fig.tight_layout()
    return fig
