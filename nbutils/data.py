"""Data sets and one-class splits.

One call, :func:`load_one_class`, turns a labelled data set into the one-class problem the
book studies: train and validation images of the *normal* class, and a test set where
label 1 means anomaly. Images are ``float32`` arrays of shape ``(N, C, H, W)`` in ``[0, 1]``.

Real data sets keep their real loading path (torchvision ``download=True`` into the data
root, MVTec AD's folder layout); when files are missing and cannot be fetched, a
:class:`DataMissingError` says exactly which files to put where.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nbutils.config import data_dir, path_roots, portable_paths

PROTOCOLS = ("full", "gradcon50")
DIGIT_NAMES = [str(i) for i in range(10)]
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]
MVTEC_CATEGORIES = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                    "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                    "zipper"]
SYNTHETIC_CATEGORIES = ["brick", "grass", "gravel"]

# Files torchvision downloads for the IDX-format sets, with their official MD5 sums.
IDX_FILES = {
    "MNIST": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}


class DataError(ValueError):
    """A data request that cannot be served (unknown set, class, protocol...)."""


class DataMissingError(FileNotFoundError):
    """Files are missing (or corrupt) and could not be fetched."""


@dataclass
class ImageSet:
    """A labelled image collection: ``x`` (N, C, H, W) float32 in [0, 1], ``y`` int labels."""

    x: np.ndarray
    y: np.ndarray
    masks: np.ndarray | None = None  # (N, H, W) uint8, 1 = anomalous pixel


@dataclass
class OneClassSplit:
    """The one-class problem for one normal class. ``test_labels``: 1 = anomaly."""

    dataset: str
    normal_class: int
    normal_class_name: str
    class_names: list[str]
    protocol: str
    seed: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    test_classes: np.ndarray  # original class (or defect type) of each test image
    test_masks: np.ndarray | None = None
    source: str = ""  # where the images came from, in words
    extra: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])

    def summary(self) -> str:
        n_anom = int(self.test_labels.sum())
        return (f"{self.dataset} | normal class {self.normal_class} ({self.normal_class_name!r}) | "
                f"protocol {self.protocol} | seed {self.seed}\n"
                f"train {len(self.train)}, val {len(self.val)}, test {len(self.test)} "
                f"({len(self.test) - n_anom} normal, {n_anom} anomalous), images "
                f"{self.image_shape}{', with pixel masks' if self.test_masks is not None else ''}\n"
                f"source: {self.source}")

    def describe(self) -> dict:
        """A JSON-friendly description for run records."""
        return {"dataset": self.dataset, "normal_class": self.normal_class,
                "normal_class_name": self.normal_class_name, "protocol": self.protocol,
                "n_train": len(self.train), "n_val": len(self.val), "n_test": len(self.test),
                "n_test_anomalies": int(self.test_labels.sum()),
                "image_shape": list(self.image_shape), "source": self.source}


# --------------------------------------------------------------------------------------
# Helpers


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resize(x: np.ndarray, size: int | None) -> np.ndarray:
    """Resize (N, C, H, W) images to ``size`` x ``size`` (bilinear, antialiased)."""
    if size is None or x.shape[-1] == size and x.shape[-2] == size:
        return x
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(x), 2048):  # chunks keep memory flat on large sets
        t = torch.from_numpy(np.ascontiguousarray(x[start:start + 2048]))
        out.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False).clamp_(0, 1).numpy())
    return np.concatenate(out) if out else x.reshape(0, x.shape[1], size, size)


def set_channels(x: np.ndarray, channels: int | None) -> np.ndarray:
    """Convert between grey (1) and RGB (3) channels; ``None`` keeps them."""
    if channels is None or x.shape[1] == channels:
        return x
    if channels == 3 and x.shape[1] == 1:
        return np.repeat(x, 3, axis=1)
    if channels == 1 and x.shape[1] == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)[None, :, None, None]
        return (x * weights).sum(axis=1, keepdims=True).astype(np.float32)
    raise DataError(f"cannot convert {x.shape[1]} channels to {channels}")


def _to_float(images_uint8: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 -> (N, C, H, W) float32 in [0, 1]."""
    x = images_uint8.astype(np.float32) / 255.0
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2).copy()


# --------------------------------------------------------------------------------------
# Loaders: each returns {"train": ImageSet, "test": ImageSet} for one data root.


def _load_digits(root: Path) -> dict[str, ImageSet]:
    """scikit-learn's 1,797 embedded 8x8 digits, split 2/3 : 1/3 with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    # The split is fixed (seed 0) so that every run seed sees the same test set.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=1 / 3, stratify=y, random_state=0)
    return {"train": ImageSet(x_tr, y_tr), "test": ImageSet(x_te, y_te)}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_download_hint(folder: str, raw: Path) -> str:
    files = "\n".join(f"  {raw / name}  (md5 {md5})" for name, md5 in IDX_FILES[folder].items())
    return f"Put these files there (torchvision's layout), or run once with a network:\n{files}"


def _ensure_idx_files(root: Path, folder: str) -> Path:
    """Verify the four IDX files (downloading them with torchvision if absent)."""
    raw = root / folder / "raw"
    missing = [n for n in IDX_FILES[folder] if not (raw / n).exists()]
    if missing:
        import torchvision

        dataset_cls = {"MNIST": torchvision.datasets.MNIST,
                       "FashionMNIST": torchvision.datasets.FashionMNIST}[folder]
        try:
            for train in (True, False):
                dataset_cls(root=str(root), train=train, download=True)
        except Exception as err:  # no network, read-only root, ...
            raise DataMissingError(
                f"{folder} is not in the data root {root} and could not be downloaded "
                f"({type(err).__name__}: {err}).\n{_idx_download_hint(folder, raw)}\n"
                "Set DATA_DIR (or pass data_root=) to choose another data root.") from err
    for name, expected in IDX_FILES[folder].items():
        actual = md5sum(raw / name)
        if actual != expected:
            raise DataMissingError(
                f"{raw / name} is corrupt: md5 {actual}, expected {expected}. "
                "Delete it and download again (or copy a good file there).")
    return raw


def _load_idx_set(root: Path, folder: str) -> dict[str, ImageSet]:
    raw = _ensure_idx_files(root, folder)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(raw / f"{prefix}-images-idx3-ubyte.gz")
        y = _read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        out[split] = ImageSet(_to_float(x), y)
    return out


def _torchvision_error(name: str, root: Path, expected: str, err: Exception) -> DataMissingError:
    return DataMissingError(
        f"{name} is not in the data root {root} and could not be downloaded "
        f"({type(err).__name__}: {err}).\nExpected: {expected}\n"
        "Run once on a machine with a network (torchvision downloads it), or copy the files "
        "there; set DATA_DIR to choose another data root.")


def _load_cifar10(root: Path) -> dict[str, ImageSet]:
    import torchvision

    out = {}
    try:
        for split, train in (("train", True), ("test", False)):
            ds = torchvision.datasets.CIFAR10(root=str(root), train=train, download=True)
            out[split] = ImageSet(_to_float(ds.data), np.asarray(ds.targets, dtype=np.int64))
    except Exception as err:
        raise _torchvision_error(
            "CIFAR-10", root, f"{root}/cifar-10-batches-py/ (from cifar-10-python.tar.gz, "
            "md5 c58f30108f718f92721af3b95e74349a)", err) from err
    return out


def _load_svhn(root: Path) -> dict[str, ImageSet]:
    import torchvision

    out = {}
    try:
        for split in ("train", "test"):
            ds = torchvision.datasets.SVHN(root=str(root), split=split, download=True)
            x = ds.data.astype(np.float32) / 255.0  # already (N, C, H, W)
            out[split] = ImageSet(x, np.asarray(ds.labels, dtype=np.int64))
    except Exception as err:
        raise _torchvision_error(
            "SVHN", root, f"{root}/train_32x32.mat and {root}/test_32x32.mat "
            "(md5 e26dedcc434d2e4c54c9b2d4a06d8373 and eb5a983be6a315427106f1b164d9cef3)",
            err) from err
    return out


# MVTec AD layout: <category>/train/good/*.png, <category>/test/<defect>/*.png,
# <category>/ground_truth/<defect>/<name>_mask.png (no masks for test/good). Any folder in this
# layout under the MVTec root is a category: the 15 of MVTec AD, or a user's own images.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def mvtec_root(root: Path) -> Path:
    """MVTec AD's folder in the data root (``mvtec/`` or ``mvtec_anomaly_detection/``)."""
    for name in ("mvtec", "mvtec_anomaly_detection"):
        if (root / name).is_dir():
            return root / name
    return root / "mvtec"


def mvtec_categories(data_root: str | Path | None = None) -> list[str]:
    """The 15 MVTec AD categories (fixed indices 0-14), then every other folder under the MVTec
    root (``DATA_DIR/mvtec/<category>``: your own data in MVTec's layout), sorted by name."""
    base = mvtec_root(data_dir(data_root))
    extra = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and ".tmp-" not in p.name and p.name not in MVTEC_CATEGORIES) \
        if base.is_dir() else []
    return MVTEC_CATEGORIES + extra


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.stem.endswith("_mask")) if folder.is_dir() else []


def _mask_path(folder: Path, kind: str, image: Path) -> Path | None:
    """``ground_truth/<kind>/<name>_mask.png`` (or another image format) if it exists."""
    for suffix in IMAGE_SUFFIXES:
        path = folder / "ground_truth" / kind / f"{image.stem}_mask{suffix}"
        if path.exists():
            return path
    return None


def check_mvtec_category(folder: Path) -> dict[str, list[Path]]:
    """Validate one category in MVTec AD's layout and list its images per test kind (``good``
    first). A :class:`DataMissingError` names everything that is missing and where it goes:
    normal images in ``train/good`` and ``test/good``, defective ones in ``test/<defect>``, and
    for each defective image a mask ``ground_truth/<defect>/<name>_mask.png`` (white = defect)."""
    folder = Path(folder)
    problems = []
    if not _images(folder / "train" / "good"):
        problems.append(f"no training images: put normal (defect-free) images in "
                        f"{folder / 'train' / 'good'}/")
    if not _images(folder / "test" / "good"):
        problems.append(f"no normal test images: put defect-free test images in "
                        f"{folder / 'test' / 'good'}/")
    kinds = {"good": _images(folder / "test" / "good")}
    test = folder / "test"
    for d in sorted(test.iterdir() if test.is_dir() else []):
        if d.is_dir() and d.name != "good" and _images(d):
            kinds[d.name] = _images(d)
    if len(kinds) == 1:
        problems.append(f"no defective test images: put them in {test}/<defect type>/ (one "
                        "folder per kind of defect, e.g. test/scratch/)")
    missing = [folder / "ground_truth" / kind / f"{img.stem}_mask.png"
               for kind, images in kinds.items() if kind != "good"
               for img in images if _mask_path(folder, kind, img) is None]
    if missing:
        shown = "\n".join(f"    {m}" for m in missing[:5])
        more = f"\n    ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        problems.append(f"{len(missing)} defective test image(s) without a mask (every image "
                        f"test/<defect>/<name> needs ground_truth/<defect>/<name>_mask.png, "
                        f"white where the defect is); missing:\n{shown}{more}")
    if problems:
        raise DataMissingError(
            f"the MVTec-layout category {folder.name!r} at {folder} is incomplete:\n"
            + "\n".join(f"  - {p}" for p in problems))
    return kinds


def _read_image(path: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """One image of any size, mode and bit depth as (C, H, W) float32 in [0, 1], resized to
    ``size`` (H, W) like :func:`resize` does."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float greyscale
            grey = np.asarray(img, dtype=np.float32)
            x = grey / (65535.0 if grey.max() > 255 else 255.0)
            x = x[None] if channels == 1 else np.repeat(x[None], 3, axis=0)
        else:
            x = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
            x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    x = np.clip(x, 0, 1)[None]
    if size is not None and x.shape[-2:] != size:
        import torch
        import torch.nn.functional as F

        x = F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size=size, mode="bilinear",
                          antialias=True, align_corners=False).clamp_(0, 1).numpy()
    return x[0]


def _read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A mask as (H, W) uint8, 1 = defect: white (or any non-zero value in a 0/1 mask),
    resized with nearest neighbour."""
    from PIL import Image

    with Image.open(path) as img:
        m = np.asarray(img.convert("L") if img.mode not in ("1", "L") else img, dtype=np.uint8)
    m = (m > (127 if m.max() > 1 else 0)).astype(np.uint8)
    if m.shape != size:
        import torch
        import torch.nn.functional as F

        m = F.interpolate(torch.from_numpy(m[None, None].astype(np.float32)), size=size,
                          mode="nearest")[0, 0].numpy().astype(np.uint8)
    return m


def load_mvtec_category(folder: Path, image_size: int | None = None, channels: int = 3) -> dict:
    """Read one category in MVTec AD's layout (validated by :func:`check_mvtec_category`).

    Images of any size, greyscale or colour, are read with ``channels`` channels (3: grey
    images are repeated; 1: colour images are converted to grey) and resized to
    ``image_size`` x ``image_size`` (bilinear, antialiased), or, without ``image_size``, to the
    size of the first training image. Masks are resized with nearest neighbour.
    """
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, not {channels}")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataMissingError(f"no MVTec-layout category at {folder} (folder missing)")
    kinds = check_mvtec_category(folder)
    train_paths = _images(folder / "train" / "good")
    if image_size is not None:
        size = (image_size, image_size)
    else:
        from PIL import Image

        with Image.open(train_paths[0]) as first:
            size = (first.height, first.width)
    train = np.stack([_read_image(p, channels, size) for p in train_paths])
    test, labels, kind_index, masks = [], [], [], []
    for index, (kind, paths) in enumerate(kinds.items()):
        for path in paths:
            test.append(_read_image(path, channels, size))
            labels.append(int(kind != "good"))
            kind_index.append(index)
            masks.append(np.zeros(size, dtype=np.uint8) if kind == "good"
                         else _read_mask(_mask_path(folder, kind, path), size))
    return {"train": train, "test": np.stack(test), "labels": np.asarray(labels, dtype=np.int64),
            "kinds": np.asarray(kind_index, dtype=np.int64), "masks": np.stack(masks),
            "defect_types": list(kinds)}


LoaderFn = Callable[[Path], dict[str, ImageSet]]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    class_names: list[str]
    source: str
    loader: LoaderFn | None = None  # None: an MVTec-layout set, one category per "class"


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", DIGIT_NAMES,
                          "scikit-learn load_digits (real 8x8 digits, embedded; fixed 2/3:1/3 split)",
                          _load_digits),
    "mnist": DatasetInfo("mnist", DIGIT_NAMES, "MNIST (torchvision layout)",
                         lambda root: _load_idx_set(root, "MNIST")),
    "fashion_mnist": DatasetInfo("fashion_mnist", FASHION_NAMES,
                                 "Fashion-MNIST (torchvision layout)",
                                 lambda root: _load_idx_set(root, "FashionMNIST")),
    "cifar10": DatasetInfo("cifar10", CIFAR10_NAMES, "CIFAR-10 (torchvision)", _load_cifar10),
    "svhn": DatasetInfo("svhn", DIGIT_NAMES, "SVHN (torchvision; for out-of-distribution use)",
                        _load_svhn),
    "mvtec": DatasetInfo("mvtec", MVTEC_CATEGORIES, "MVTec AD (folder layout)"),
    "synthetic": DatasetInfo("synthetic", SYNTHETIC_CATEGORIES,
                             "SYNTHETIC textures in MVTec layout (scikit-image brick/grass/gravel "
                             "with drawn defects; not real inspection data)"),
}


def dataset_info(name: str, data_root: str | Path | None = None) -> DatasetInfo:
    """A data set's description; for ``mvtec`` its classes are the categories found in the
    data root besides MVTec AD's 15 (:func:`mvtec_categories`)."""
    try:
        info = DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
    if name == "mvtec":
        from dataclasses import replace

        return replace(info, class_names=mvtec_categories(data_root))
    return info


def resolve_class(dataset: str, normal_class: int | str,
                  data_root: str | Path | None = None) -> int:
    """Accept a class index (``4``, ``"4"``) or a class name (``"deer"``, ``"bottle"``, or the
    folder name of your own category under ``DATA_DIR/mvtec/``)."""
    names = dataset_info(dataset, data_root).class_names
    if isinstance(normal_class, (int, np.integer)) and not isinstance(normal_class, bool):
        index = int(normal_class)
    elif isinstance(normal_class, str) and normal_class.strip().lstrip("-").isdigit():
        index = int(normal_class)
    else:
        lowered = [n.lower() for n in names]
        key = str(normal_class).strip().lower()
        if key not in lowered:
            hint = (f"; or put your own category in MVTec's layout at "
                    f"{mvtec_root(data_dir(data_root)) / str(normal_class)}/ (train/good, "
                    "test/good, test/<defect>, ground_truth/<defect>)" if dataset == "mvtec"
                    else "")
            raise DataError(f"unknown class {normal_class!r} for {dataset}; valid: "
                            + ", ".join(f"{i}={n}" for i, n in enumerate(names)) + hint)
        index = lowered.index(key)
    if not 0 <= index < len(names):
        raise DataError(f"class {index} is out of range for {dataset} "
                        f"(0..{len(names) - 1}: {', '.join(names)})")
    return index


_CACHE: dict[tuple[str, str], dict[str, ImageSet]] = {}


def load_images(dataset: str, split: str = "test", data_root: str | Path | None = None,
                image_size: int | None = None, channels: int | None = None) -> ImageSet:
    """All images of one split of a labelled data set (e.g. an out-of-distribution set)."""
    info = dataset_info(dataset)
    if info.loader is None:
        raise DataError(f"{dataset} is per-category; use load_one_class")
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    root = data_dir(data_root)
    key = (dataset, str(root))
    if key not in _CACHE:
        _CACHE[key] = info.loader(root)
    s = _CACHE[key][split]
    return ImageSet(set_channels(resize(s.x, image_size), channels), s.y.copy())


def _subsample(rng: np.random.Generator, n: int, limit: int | None) -> np.ndarray:
    idx = np.arange(n)
    return np.sort(rng.choice(idx, size=limit, replace=False)) if limit and limit < n else idx


def load_one_class(dataset: str, normal_class: int | str, protocol: str = "full", seed: int = 0,
                   data_root: str | Path | None = None, image_size: int | None = None,
                   channels: int | None = None, val_fraction: float = 0.1,
                   max_train: int | None = None, max_test: int | None = None) -> OneClassSplit:
    """Build the one-class split for ``normal_class``.

    - ``full``: test on the whole test split, normal class vs the rest.
    - ``gradcon50``: GradCon's official test: every normal test image plus an equal number of
      anomalies drawn at random (seeded by ``seed``).

    Validation is ``val_fraction`` of the normal training images, drawn with ``seed``.
    ``max_train``/``max_test`` subsample (seeded) for quick runs; anomalies keep their share.
    """
    info = dataset_info(dataset, data_root)
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    cls = resolve_class(dataset, normal_class, data_root)
    rng = np.random.default_rng(seed)
    root = data_dir(data_root)
    masks = None
    extra: dict = {}
    if info.loader is None:
        folder = _mvtec_folder(dataset, root, info.class_names[cls])
        cat = load_mvtec_category(folder, image_size, 1 if channels == 1 else 3)
        normal_train = cat["train"]
        test_x, test_labels, test_classes, masks = (cat["test"], cat["labels"], cat["kinds"],
                                                    cat["masks"])
        extra["defect_types"] = cat["defect_types"]
        source = f"{info.source}: {portable_paths(str(folder), path_roots(root))}"
    else:
        train = load_images(dataset, "train", root, image_size)
        test = load_images(dataset, "test", root, image_size)
        normal_train = train.x[train.y == cls]
        test_x, test_classes = test.x, test.y
        test_labels = (test.y != cls).astype(np.int64)
        source = info.source if dataset != "mnist" else f"{info.source}: $DATA_DIR/MNIST"

    if protocol == "gradcon50":
        normal_idx = np.flatnonzero(test_labels == 0)
        anomal_idx = np.flatnonzero(test_labels == 1)
        take = rng.choice(anomal_idx, size=min(len(normal_idx), len(anomal_idx)), replace=False)
        keep = np.sort(np.concatenate([normal_idx, take]))
        test_x, test_labels, test_classes = test_x[keep], test_labels[keep], test_classes[keep]
        masks = masks[keep] if masks is not None else None
    if max_test and max_test < len(test_x):
        keep = _subsample(rng, len(test_x), max_test)
        if test_labels[keep].min() == test_labels[keep].max():  # keep both labels present
            keep = np.sort(np.concatenate([keep[:-1], [np.flatnonzero(
                test_labels != test_labels[keep[0]])[0]]]))
        test_x, test_labels, test_classes = test_x[keep], test_labels[keep], test_classes[keep]
        masks = masks[keep] if masks is not None else None

    order = rng.permutation(len(normal_train))
    n_val = max(1, int(round(val_fraction * len(normal_train))))
    val, train_x = normal_train[np.sort(order[:n_val])], normal_train[np.sort(order[n_val:])]
    train_x = train_x[_subsample(rng, len(train_x), max_train)]

    return OneClassSplit(
        dataset=dataset, normal_class=cls, normal_class_name=info.class_names[cls],
        class_names=list(info.class_names), protocol=protocol, seed=seed,
        train=set_channels(train_x, channels), val=set_channels(val, channels),
        test=set_channels(test_x, channels), test_labels=test_labels, test_classes=test_classes,
        test_masks=masks, source=source, extra=extra)


def _mvtec_folder(dataset: str, root: Path, category: str) -> Path:
    if dataset == "synthetic":
        from nbutils.synthetic import synthetic_root, write_synthetic_mvtec

        folder = synthetic_root(root) / category
        if not (folder / "train" / "good").is_dir():
            write_synthetic_mvtec(synthetic_root(root), categories=[category])
        return folder
    folder = mvtec_root(root) / category
    if category not in MVTEC_CATEGORIES:  # the user's own category: its folder exists
        return folder
    if not (folder / "train" / "good").is_dir():
        raise DataMissingError(
            f"MVTec AD category {category!r} not found at {folder}.\n"
            "MVTec AD cannot be downloaded automatically (its licence must be accepted): get "
            "mvtec_anomaly_detection.tar.xz from https://www.mvtec.com/company/research/"
            f"datasets/mvtec-ad and extract it so that {folder}/train/good/ exists "
            f"(into {mvtec_root(root)}). Set DATA_DIR to choose another data root. Your own "
            f"images in MVTec's layout go in {mvtec_root(root)}/<category>/.")
    return folder
