import hashlib
import urllib.error

import numpy as np
import pytest

from nbutils import data
from nbutils.data import DataError, DataMissingError, load_images, load_one_class, resolve_class


def _hashes(x):
    return {hashlib.sha1(img.tobytes()).hexdigest() for img in x}


def test_digits_split_has_only_the_normal_class_in_train_and_val():
    split = load_one_class("digits", 3, seed=0)
    train = load_images("digits", "train")
    normal = _hashes(train.x[train.y == 3])
    others = _hashes(train.x[train.y != 3])
    assert _hashes(split.train) <= normal and _hashes(split.val) <= normal
    assert not (_hashes(split.train) | _hashes(split.val)) & others
    # every normal training image lands in exactly one of train and val
    assert len(split.train) + len(split.val) == int((train.y == 3).sum())
    assert len(split.val) == round(0.1 * int((train.y == 3).sum()))


def test_test_labels_match_classes():
    split = load_one_class("digits", "7", protocol="full")
    assert np.array_equal(split.test_labels == 0, split.test_classes == 7)
    test = load_images("digits", "test")
    assert len(split.test) == len(test.x)
    assert split.test_labels.sum() == int((test.y != 7).sum())


def test_gradcon50_protocol_is_balanced_and_keeps_every_normal_image():
    full = load_one_class("digits", 2, protocol="full")
    half = load_one_class("digits", 2, protocol="gradcon50", seed=5)
    n_normal = int((full.test_labels == 0).sum())
    assert int((half.test_labels == 0).sum()) == n_normal == int(half.test_labels.sum())
    assert np.array_equal(half.test_labels == 0, half.test_classes == 2)


def test_seeding_is_reproducible_and_seed_dependent():
    a = load_one_class("digits", 1, protocol="gradcon50", seed=1)
    b = load_one_class("digits", 1, protocol="gradcon50", seed=1)
    c = load_one_class("digits", 1, protocol="gradcon50", seed=2)
    assert np.array_equal(a.val, b.val) and np.array_equal(a.test, b.test)
    assert not np.array_equal(a.val, c.val)
    assert not np.array_equal(a.test_classes, c.test_classes)


def test_resize_channels_and_subsampling():
    split = load_one_class("digits", 0, image_size=28, channels=3, max_train=20, max_test=30)
    assert split.train.shape[1:] == (3, 28, 28) and len(split.train) == 20
    assert len(split.test) == 30 and 0 < split.test_labels.sum() < 30
    assert split.train.dtype == np.float32 and 0 <= split.train.min() and split.train.max() <= 1


def test_class_names_and_indices():
    assert resolve_class("cifar10", "deer") == 4
    assert resolve_class("cifar10", "Deer") == 4
    assert resolve_class("mvtec", "bottle") == 0
    assert resolve_class("mnist", "4") == 4 and resolve_class("mnist", 4) == 4
    with pytest.raises(DataError, match=r"out of range.*0\.\.9"):
        resolve_class("mnist", 10)
    with pytest.raises(DataError, match="valid: 0=airplane"):
        resolve_class("cifar10", "zebra")


def test_unknown_dataset_and_protocol_list_the_known_ones():
    with pytest.raises(DataError, match="known: digits, mnist, fashion_mnist"):
        load_one_class("imagenet", 0)
    with pytest.raises(DataError, match="known: full, gradcon50"):
        load_one_class("digits", 0, protocol="half")


def _no_network(*args, **kwargs):
    raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: "
                       + str(urllib.error.URLError("no network")))


def test_missing_mnist_without_network_says_which_files_to_put_where(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "MNIST", _no_network)
    with pytest.raises(DataMissingError) as err:
        load_one_class("mnist", 0, data_root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz") in message
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in message and "DATA_DIR" in message


def test_missing_cifar_without_network(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _no_network)
    with pytest.raises(DataMissingError, match="cifar-10-batches-py"):
        load_one_class("cifar10", "deer", data_root=tmp_path)


def test_corrupt_file_is_reported_with_its_checksum(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.IDX_FILES["MNIST"]:
        (raw / name).write_bytes(b"not the real file")
    with pytest.raises(DataMissingError, match="corrupt: md5 .* expected f68b3c2d"):
        load_one_class("mnist", 0, data_root=tmp_path)


def test_missing_mvtec_explains_where_to_extract_it(tmp_path):
    with pytest.raises(DataMissingError, match=r"bottle.*train/good.*mvtec"):
        load_one_class("mvtec", "bottle", data_root=tmp_path)


def test_mvtec_layout_with_missing_mask_is_an_error(tmp_path):
    from nbutils.synthetic import write_synthetic_mvtec

    root = write_synthetic_mvtec(tmp_path / "mv", categories=["grass"], image_size=32,
                                 n_train=3, n_test_good=2, n_test_per_defect=1)
    next((root / "grass" / "ground_truth").rglob("*_mask.png")).unlink()
    with pytest.raises(DataMissingError, match="1 defective test image.* without a mask"):
        data.load_mvtec_category(root / "grass")


def _write_image(path, size, mode, value=None, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    elif mode == "I;16":
        pixels = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    else:
        pixels = rng.integers(0, 256, (h, w), dtype=np.uint8) if value is None else \
            np.full((h, w), value, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _mask(path, size, scale=255):
    from PIL import Image

    m = np.zeros(size, dtype=np.uint8)
    m[size[0] // 3: size[0] // 2, size[1] // 4: size[1] // 2] = scale
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)


def _custom_category(data_root, name="widgets"):
    """A user's own category in MVTec's layout: odd sizes, grey and colour, jpg and png, a
    16-bit image, 0/255 and 0/1 masks."""
    folder = data_root / "mvtec" / name
    _write_image(folder / "train" / "good" / "a.png", (37, 53), "RGB", seed=1)
    _write_image(folder / "train" / "good" / "b.png", (40, 40), "L", seed=2)
    _write_image(folder / "train" / "good" / "c.jpg", (29, 61), "RGB", seed=3)
    _write_image(folder / "train" / "good" / "d.png", (33, 33), "I;16", seed=4)
    _write_image(folder / "train" / "good" / "e.png", (50, 31), "L", seed=5)
    _write_image(folder / "test" / "good" / "g1.png", (37, 53), "L", seed=6)
    _write_image(folder / "test" / "good" / "g2.png", (45, 45), "RGB", seed=7)
    _write_image(folder / "test" / "dent" / "d1.png", (37, 53), "RGB", seed=8)
    _mask(folder / "ground_truth" / "dent" / "d1_mask.png", (37, 53))
    _write_image(folder / "test" / "dent" / "d2.png", (60, 44), "L", seed=9)
    _mask(folder / "ground_truth" / "dent" / "d2_mask.png", (60, 44), scale=1)
    return folder


def test_own_category_in_mvtec_layout_is_found_and_read(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    _custom_category(tmp_path)
    assert data.dataset_info("mvtec").class_names[-1] == "widgets"
    assert resolve_class("mvtec", "widgets") == 15 and resolve_class("mvtec", "bottle") == 0
    split = load_one_class("mvtec", "widgets", image_size=16)
    assert split.normal_class == 15 and split.normal_class_name == "widgets"
    assert split.train.shape[1:] == (3, 16, 16) and len(split.train) + len(split.val) == 5
    assert split.test.shape == (4, 3, 16, 16) and split.test_labels.tolist() == [0, 0, 1, 1]
    assert split.extra["defect_types"] == ["good", "dent"]
    assert split.test_masks.shape == (4, 16, 16) and split.test_masks.dtype == np.uint8
    assert split.test_masks[:2].sum() == 0 and (split.test_masks[2:].sum(axis=(1, 2)) > 0).all()
    assert split.train.dtype == np.float32 and 0 <= split.train.min() <= split.train.max() <= 1
    assert split.source == "MVTec AD (folder layout): $DATA_DIR/mvtec/widgets"
    grey = load_one_class("mvtec", "widgets", image_size=16, channels=1)
    assert grey.train.shape[1:] == (1, 16, 16) and grey.test.shape == (4, 1, 16, 16)


def test_own_category_without_image_size_takes_the_first_training_images_size(tmp_path):
    folder = _custom_category(tmp_path)
    cat = data.load_mvtec_category(folder)
    assert cat["train"].shape == (5, 3, 37, 53) and cat["test"].shape == (4, 3, 37, 53)
    assert cat["masks"].shape == (4, 37, 53) and set(np.unique(cat["masks"])) == {0, 1}
    # the 0/255 mask of d1 (already 37x53) is read as it is: a rectangle of ones
    assert cat["masks"][2].sum() == (37 // 2 - 37 // 3) * (53 // 2 - 53 // 4)


def test_own_category_with_a_missing_mask_names_the_file_to_add(tmp_path):
    folder = _custom_category(tmp_path)
    (folder / "ground_truth" / "dent" / "d2_mask.png").unlink()
    with pytest.raises(DataMissingError) as err:
        load_one_class("mvtec", "widgets", data_root=tmp_path)
    message = str(err.value)
    assert "'widgets'" in message and str(folder / "ground_truth" / "dent" / "d2_mask.png") in message
    assert "1 defective test image(s) without a mask" in message and "d1_mask" not in message


def test_incomplete_category_lists_everything_missing(tmp_path):
    folder = tmp_path / "mvtec" / "parts"
    _write_image(folder / "test" / "good" / "g.png", (20, 20), "L")
    with pytest.raises(DataMissingError) as err:
        load_one_class("mvtec", "parts", data_root=tmp_path)
    message = str(err.value)
    assert f"put normal (defect-free) images in {folder / 'train' / 'good'}/" in message
    assert f"no defective test images: put them in {folder / 'test'}/<defect type>/" in message
    assert "normal test images" not in message  # test/good is there
    with pytest.raises(DataError, match=r"unknown class 'gears'.*mvtec/gears/ \(train/good"):
        load_one_class("mvtec", "gears", data_root=tmp_path)


def test_real_mvtec_bottle(mvtec_bottle):
    split = load_one_class("mvtec", "bottle", data_root=mvtec_bottle, image_size=32)
    assert split.normal_class == 0 and len(split.train) + len(split.val) == 209
    assert split.train.shape[1:] == (3, 32, 32)
    assert split.extra["defect_types"] == ["good", "broken_large", "broken_small", "contamination"]
    assert len(split.test) == 83 and int(split.test_labels.sum()) == 63
    anomalous = split.test_masks[split.test_labels == 1]
    assert split.test_masks[split.test_labels == 0].sum() == 0
    assert (anomalous.reshape(63, -1).sum(axis=1) > 0).all()


def test_real_mnist_counts(mnist_root):
    split = load_one_class("mnist", 4, data_root=mnist_root)
    assert len(split.test) == 10_000 and int((split.test_labels == 0).sum()) == 982
    assert len(split.train) + len(split.val) == 5842
    assert split.train.shape[1:] == (1, 28, 28)
