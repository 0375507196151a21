"""The synthetic texture set: MVTec AD's layout, honest masks, determinism, atomic writes."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nbutils.data import load_mvtec_category, load_one_class
from nbutils.synthetic import (
    DEFECT_TYPES,
    _crop,
    _defect,
    _texture,
    synthetic_root,
    write_synthetic_mvtec,
)

SMALL = {"image_size": 64, "n_train": 5, "n_test_good": 3, "n_test_per_defect": 2}


def _write(root: Path, category: str = "grass", **overrides) -> Path:
    write_synthetic_mvtec(root, categories=[category], **{**SMALL, **overrides})
    return root / category


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def grass(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("syn"))


def test_layout(grass):
    names = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert names(grass) == ["ground_truth", "test", "train"]
    assert names(grass / "train" / "good") == [f"{i:03d}.png" for i in range(5)]
    assert names(grass / "test") == sorted(["good", *DEFECT_TYPES])
    assert names(grass / "test" / "good") == ["000.png", "001.png", "002.png"]
    assert names(grass / "ground_truth") == sorted(DEFECT_TYPES)  # no masks for good
    assert (grass.parent / "README.txt").read_text().startswith("SYNTHETIC")
    assert not list(grass.parent.glob("*.tmp-*"))


def test_images_and_masks(grass):
    for path in (grass / "train" / "good").glob("*.png"):
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.size == (64, 64)
    for kind in DEFECT_TYPES:
        for path in sorted((grass / "test" / kind).glob("*.png")):
            mask_path = grass / "ground_truth" / kind / f"{path.stem}_mask.png"
            with Image.open(path) as img, Image.open(mask_path) as mask:
                assert img.mode == "RGB" and mask.mode == "L" and mask.size == img.size
                m = np.asarray(mask)
            assert set(np.unique(m)) == {0, 255}
            assert 0.002 <= (m > 0).mean() <= 0.05, (kind, path.name)


def test_masks_mark_exactly_the_changed_pixels():
    rng = np.random.default_rng(1)
    for category in ("brick", "grass", "gravel"):
        clean = _crop(rng, _texture(category), 64)[..., None] * np.ones(3)
        for kind in DEFECT_TYPES:
            out, mask = _defect(rng, clean, kind)
            changed = np.abs(np.round(out) - np.round(clean)).max(axis=-1) > 0
            assert not changed[~mask].any(), kind  # nothing outside the mask changed
            # inside the mask, (almost) every pixel visibly changed
            assert np.abs(out - clean).max(axis=-1)[mask].mean() > 20, (category, kind)


def test_loads_through_mvtec_path(grass):
    cat = load_mvtec_category(grass, image_size=32)
    assert cat["train"].shape == (5, 3, 32, 32) and cat["train"].dtype == np.float32
    n_test = 3 + 2 * len(DEFECT_TYPES)
    assert cat["test"].shape == (n_test, 3, 32, 32)
    assert cat["masks"].shape == (n_test, 32, 32)
    assert cat["defect_types"] == ["good", *sorted(DEFECT_TYPES)]
    assert cat["labels"].tolist() == [0] * 3 + [1] * (n_test - 3)
    good = cat["labels"] == 0
    assert cat["masks"][good].sum() == 0
    assert (cat["masks"][~good].reshape(n_test - 3, -1).sum(axis=1) > 0).all()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(_write(tmp_path / "a"))
    assert a == _files(_write(tmp_path / "b"))
    # Per-category seeding: written alongside other categories, grass is unchanged.
    write_synthetic_mvtec(tmp_path / "c", categories=["brick", "grass"], **SMALL)
    assert a == _files(tmp_path / "c" / "grass")
    assert a != _files(_write(tmp_path / "d", seed=1))


def test_existing_category_is_skipped(tmp_path):
    folder = _write(tmp_path)
    marker = folder / "train" / "good" / "000.png"
    before = marker.stat().st_mtime_ns
    _write(tmp_path, seed=5)
    assert marker.stat().st_mtime_ns == before


def test_leftover_tmp_folder_is_not_complete(tmp_path):
    root = synthetic_root(tmp_path)
    leftover = root / "grass.tmp-999999" / "train" / "good"
    leftover.mkdir(parents=True)
    (leftover / "000.png").write_bytes(b"half-written")
    # An interrupted write never leaves a <category>/ folder, so the category is written.
    folder = _write(root)
    assert len(list((folder / "train" / "good").glob("*.png"))) == 5
    assert len(load_mvtec_category(folder)["train"]) == 5


def test_load_one_class_writes_and_loads(tmp_path):
    split = load_one_class("synthetic", "grass", data_root=tmp_path, image_size=32)
    assert (synthetic_root(tmp_path) / "grass" / "train" / "good" / "059.png").exists()
    assert split.normal_class_name == "grass"
    assert len(split.train) + len(split.val) == 60
    assert split.train.shape[1:] == (3, 32, 32)
    assert len(split.test) == 20 + 10 * len(DEFECT_TYPES)
    assert split.test_masks.shape == (len(split.test), 32, 32)
    assert int(split.test_labels.sum()) == 10 * len(DEFECT_TYPES)
    assert split.extra["defect_types"] == ["good", *sorted(DEFECT_TYPES)]
