"""Synthetic texture anomalies in MVTec AD's folder layout.

MVTec AD cannot be downloaded automatically (its licence must be accepted), so the book's
pixel-level examples need a stand-in that runs offline. This module crops scikit-image's
embedded textures (brick, grass, gravel), draws four kinds of defects on some crops, and
writes everything to disk exactly as MVTec AD lays it out, so that the *real* MVTec loading
path (:func:`nbutils.data.load_mvtec_category`) is the one exercised::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png   (uint8 0/255, single channel)

These are SYNTHETIC images, not real inspection data.
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import draw

DEFAULT_CATEGORIES = ["brick", "grass", "gravel"]
DEFECT_TYPES = ["scratch", "hole", "stain", "cut"]
# A mild fixed tint per texture, so the RGB channels are not all identical.
TINTS = {"brick": (1.0, 0.86, 0.78), "grass": (0.82, 1.0, 0.74), "gravel": (1.0, 0.97, 0.92)}
MIN_AREA, MAX_AREA = 0.002, 0.05  # accepted defect size, as a fraction of the image


def synthetic_root(data_root: Path) -> Path:
    """Where the synthetic set lives inside a data root."""
    return Path(data_root) / "synthetic_mvtec"


def _texture(category: str) -> np.ndarray:
    """The grey 512x512 uint8 texture scikit-image ships for ``category``."""
    if category not in DEFAULT_CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; known: {DEFAULT_CATEGORIES}")
    return getattr(skdata, category)()


def _crop(rng: np.random.Generator, texture: np.ndarray, size: int) -> np.ndarray:
    """A random crop (with flips and brightness jitter) as float (size, size) in [0, 255]."""
    crop = min(size, min(texture.shape))  # crop at the output size so pixels stay natural
    y, x = rng.integers(0, texture.shape[0] - crop + 1), rng.integers(0, texture.shape[1] - crop + 1)
    patch = texture[y:y + crop, x:x + crop]
    if crop != size:  # only for image_size > 512
        patch = np.asarray(Image.fromarray(patch).resize((size, size), Image.BICUBIC))
    # Flips only: a 90-degree turn would make brick rows vertical, widening "normal".
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1]
    return patch.astype(np.float64) * rng.uniform(0.93, 1.07)


def _blend(img: np.ndarray, alpha: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mix ``target`` into ``img`` with weight ``alpha``; the mask is where alpha > 0.

    Faint alpha is cut to 0 first, so every masked pixel visibly changed and no pixel
    outside the mask changed at all.
    """
    alpha = np.where(alpha < 0.2, 0.0, np.clip(alpha, 0, 1))[..., None]
    return img * (1 - alpha) + target * alpha, alpha[..., 0] > 0


def _scratch(rng, img, s):
    canvas = np.zeros(img.shape[:2])
    for _ in range(rng.integers(1, 3)):  # one or two strokes
        cy, cx = rng.uniform(0.2, 0.8, 2) * s
        angle, half = rng.uniform(0, np.pi), rng.uniform(0.15, 0.35) * s
        dy, dx = half * np.sin(angle), half * np.cos(angle)
        rr, cc, val = draw.line_aa(int(cy - dy), int(cx - dx), int(cy + dy), int(cx + dx))
        ok = (rr >= 0) & (rr < s) & (cc >= 0) & (cc < s)
        canvas[rr[ok], cc[ok]] = np.maximum(canvas[rr[ok], cc[ok]], val[ok])
    width = max(1, round(s / 128))  # ~2 px at 256
    canvas = ndimage.grey_dilation(canvas, size=width) if width > 1 else canvas
    shade = rng.uniform(225, 250) if rng.random() < 0.5 else rng.uniform(10, 30)
    return _blend(img, canvas, np.full_like(img, shade))


def _hole(rng, img, s):
    cy, cx = rng.uniform(0.2, 0.8, 2) * s
    ry, rx = rng.uniform(0.035, 0.08, 2) * s
    rr, cc = draw.ellipse(cy, cx, ry, rx, shape=img.shape[:2], rotation=rng.uniform(0, np.pi))
    disk = np.zeros(img.shape[:2])
    disk[rr, cc] = 1
    alpha = ndimage.gaussian_filter(disk, sigma=max(0.7, s / 256))  # soft-ish rim
    return _blend(img, alpha, img * 0.12)  # keep a trace of texture at the bottom


def _stain(rng, img, s):
    # A smooth random blob: a radial bump plus gaussian-filtered noise, thresholded.
    cy, cx = rng.uniform(0.25, 0.75, 2) * s
    radius = rng.uniform(0.06, 0.1) * s
    yy, xx = np.mgrid[:s, :s]
    noise = ndimage.gaussian_filter(rng.normal(size=(s, s)), sigma=radius / 4)
    noise /= np.abs(noise).max() + 1e-12
    blob = (1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2 + 1.2 * noise) > 0.3
    alpha = ndimage.gaussian_filter(blob.astype(float), sigma=max(1.0, s / 128))
    palette = [(120, 70, 30), (230, 200, 90), (40, 60, 150), (150, 30, 30)]
    colour = np.array(palette[rng.integers(len(palette))], dtype=float)
    return _blend(img, alpha, 0.35 * img + 0.65 * colour)


def _cut(rng, img, s):
    # A thin band where the texture is replaced by a darker, shifted copy of itself.
    cy, cx = rng.uniform(0.25, 0.75, 2) * s
    angle, half = rng.uniform(0, np.pi), rng.uniform(0.15, 0.3) * s
    width = max(2.0, rng.uniform(0.02, 0.035) * s)
    u = np.array([np.sin(angle), np.cos(angle)])  # along the band
    n = np.array([u[1], -u[0]])  # across it
    corners = np.array([[cy, cx] + a * half * u + b * width / 2 * n
                        for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))])
    rr, cc = draw.polygon(corners[:, 0], corners[:, 1], shape=img.shape[:2])
    band = np.zeros(img.shape[:2])
    band[rr, cc] = 1
    shift = (n * rng.uniform(0.04, 0.08) * s).round().astype(int)
    shifted = np.roll(img, tuple(shift), axis=(0, 1))
    return _blend(img, band, 0.5 * shifted)


DEFECTS: dict[str, Callable] = {"scratch": _scratch, "hole": _hole, "stain": _stain, "cut": _cut}


def _defect(rng: np.random.Generator, img: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of ``kind`` on an (H, W, 3) float image; redraw until its size is sane."""
    s = img.shape[0]
    for _ in range(50):
        out, mask = DEFECTS[kind](rng, img, s)
        if MIN_AREA <= mask.mean() <= MAX_AREA:
            return out, mask
    raise RuntimeError(f"could not draw a {kind} defect of sane size at {s}px")


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8)).save(path)


def _write_category(folder: Path, category: str, image_size: int, n_train: int,
                    n_test_good: int, n_test_per_defect: int, seed: int) -> None:
    # Seed per category (by name), so writing one category alone gives the same bytes as
    # writing it together with the others.
    rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
    texture, tint = _texture(category), np.array(TINTS[category])

    def sample() -> np.ndarray:
        return _crop(rng, texture, image_size)[..., None] * tint

    for i in range(n_train):
        _save(folder / "train" / "good" / f"{i:03d}.png", sample())
    for i in range(n_test_good):
        _save(folder / "test" / "good" / f"{i:03d}.png", sample())
    for kind in DEFECT_TYPES:
        for i in range(n_test_per_defect):
            img, mask = _defect(rng, sample(), kind)
            _save(folder / "test" / kind / f"{i:03d}.png", img)
            _save(folder / "ground_truth" / kind / f"{i:03d}_mask.png", mask * 255.0)


def write_synthetic_mvtec(root: Path, categories: list[str] | None = None, image_size: int = 256,
                          n_train: int = 60, n_test_good: int = 20, n_test_per_defect: int = 10,
                          seed: int = 0) -> Path:
    """Write synthetic texture categories under ``root`` in MVTec AD's layout; return ``root``.

    A category whose folder already has ``train/good`` is skipped (it is complete: folders
    are written as ``<category>.tmp-<pid>`` and renamed only when finished). The output is
    byte-identical for the same arguments.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    params = (f"image_size={image_size} n_train={n_train} n_test_good={n_test_good} "
              f"n_test_per_defect={n_test_per_defect} seed={seed}")
    for category in categories or DEFAULT_CATEGORIES:
        final = root / category
        if (final / "train" / "good").is_dir():
            continue
        tmp = root / f"{category}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _write_category(tmp, category, image_size, n_train, n_test_good, n_test_per_defect, seed)
        if final.exists():  # incomplete leftover without train/good: ours to replace
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "train" / "good").is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished it first
        readme = root / "README.txt"
        if not readme.exists():
            readme.write_text(
                "SYNTHETIC images, not real inspection data. Made by nbutils.synthetic from "
                "scikit-image's embedded textures (skimage.data.brick/grass/gravel): random "
                "crops with drawn defects (scratch, hole, stain, cut), in MVTec AD's folder "
                "layout. Masks in ground_truth/ mark exactly the changed pixels.\n"
                "Generator parameters per category:\n")
        with open(readme, "a") as f:
            f.write(f"{category}: {params}\n")
    return root
