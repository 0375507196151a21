"""Anomaly detection metrics: image AUROC, pixel AUROC, AU-PRO, ROC curves, bootstrap CIs.

Convention throughout: label 1 = anomaly, and a *higher* score means *more anomalous*.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels).ravel()
    if not set(np.unique(labels)) <= {0, 1}:
        raise ValueError("labels must be 0 (normal) or 1 (anomaly)")
    if labels.min() == labels.max():
        raise ValueError("AUROC needs both normal and anomalous samples")
    return labels


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of per-image scores."""
    labels = _check_labels(labels)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf")
    return float(roc_auc_score(labels, scores))


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the ROC curve."""
    fpr, tpr, _ = roc_curve(_check_labels(labels), np.asarray(scores).ravel())
    return fpr, tpr


def pixel_auroc(score_maps: np.ndarray, masks: np.ndarray) -> float:
    """AUROC over all pixels of all test images (masks: 1 = anomalous pixel)."""
    return image_auroc(np.asarray(score_maps).ravel(), np.asarray(masks).ravel().astype(int))


def bootstrap_auroc_ci(scores: np.ndarray, labels: np.ndarray, n_boot: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUROC (resampling test images)."""
    labels = _check_labels(labels)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() != labels[idx].max():  # a resample needs both classes
            values.append(roc_auc_score(labels[idx], scores[idx]))
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def pro_curve(score_maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap (PRO) against the false-positive rate, at every threshold.

    MVTec's definition: each connected component of each ground-truth mask is one region; at a
    threshold, a region's overlap is the fraction of its pixels above the threshold; PRO is the
    mean over all regions. The FPR is measured on the normal pixels of all images. Sorting every
    pixel once gives the curve exactly, at every distinct score.
    """
    from skimage.measure import label as connected_components

    score_maps = np.asarray(score_maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    if score_maps.shape != masks.shape:
        raise ValueError(f"score maps {score_maps.shape} and masks {masks.shape} differ in shape")
    weights = np.zeros(masks.shape, dtype=np.float64)  # each region's pixels share weight 1
    n_regions = 0
    for i, mask in enumerate(masks):
        components = connected_components(mask, connectivity=2)
        for region in range(1, components.max() + 1):
            pixels = components == region
            weights[i][pixels] = 1.0 / pixels.sum()
            n_regions += 1
    if n_regions == 0 or masks.all():
        raise ValueError("AU-PRO needs anomalous regions and normal pixels")
    scores, weights, normal = score_maps.ravel(), weights.ravel(), ~masks.ravel()
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    fpr = np.cumsum(normal[order]) / normal.sum()
    pro = np.cumsum(weights[order]) / n_regions
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    return np.r_[0.0, fpr[last_of_each_score]], np.r_[0.0, pro[last_of_each_score]]


def au_pro(score_maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve up to ``max_fpr``, divided by ``max_fpr`` (so 1.0 is perfect)."""
    fpr, pro = pro_curve(score_maps, masks)
    pro_at_max = np.interp(max_fpr, fpr, pro)
    keep = fpr <= max_fpr
    x, y = np.r_[fpr[keep], max_fpr], np.r_[pro[keep], pro_at_max]
    return float(np.trapezoid(y, x) / max_fpr)
