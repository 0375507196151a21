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
    with pytest.raises(DataMissingError, match="mask .* is missing"):
        data.load_mvtec_category(root / "grass")


def test_real_mnist_counts(mnist_root):
    split = load_one_class("mnist", 4, data_root=mnist_root)
    assert len(split.test) == 10_000 and int((split.test_labels == 0).sum()) == 982
    assert len(split.train) + len(split.val) == 5842
    assert split.train.shape[1:] == (1, 28, 28)
