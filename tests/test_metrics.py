import numpy as np
import pytest

from nbutils.metrics import au_pro, bootstrap_auroc_ci, image_auroc, pixel_auroc, pro_curve


def test_image_auroc_by_hand():
    # pairs (anomaly, normal): (0.35,0.1) ok, (0.35,0.4) wrong, (0.8,*) ok -> 3 of 4
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert image_auroc([1.0, 1.0], [0, 1]) == pytest.approx(0.5)  # a tie counts one half
    assert image_auroc([3, 2, 1], [0, 1, 1]) == 0.0


def test_image_auroc_rejects_bad_input():
    with pytest.raises(ValueError, match="both"):
        image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([np.nan, 0.2], [0, 1])


def test_pixel_auroc_by_hand():
    maps = np.array([[[0.9, 0.2], [0.5, 0.1]]])
    masks = np.array([[[1, 1], [0, 0]]])
    # anomalous pixels 0.9, 0.2; normal 0.5, 0.1: pairs won 1+1+0+1 = 3 of 4
    assert pixel_auroc(maps, masks) == pytest.approx(0.75)


def test_au_pro_by_hand():
    maps = np.array([[[0.9, 0.2, 0.5, 0.1]]])
    masks = np.array([[[1, 1, 0, 0]]])
    fpr, pro = pro_curve(maps, masks)
    assert np.allclose(fpr, [0, 0, 0.5, 0.5, 1]) and np.allclose(pro, [0, 0.5, 0.5, 1, 1])
    assert au_pro(maps, masks, max_fpr=0.3) == pytest.approx(0.5)
    assert au_pro(maps, masks, max_fpr=1.0) == pytest.approx(0.75)


def test_pro_weighs_regions_equally_not_pixels():
    # region A (1 pixel) found, region B (3 pixels) missed: PRO 1/2, pixel recall would be 1/4
    maps = np.array([[[0.9, 0.0, 0.1, 0.1, 0.1, 0.0]]])
    masks = np.array([[[1, 0, 1, 1, 1, 0]]])
    fpr, pro = pro_curve(maps, masks)
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0


def test_perfect_maps_give_au_pro_one():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), dtype=int)
    masks[0, 2:5, 2:5] = 1
    masks[2, 10:12, 3:9] = 1
    maps = masks + 0.1 * rng.random(masks.shape)
    assert au_pro(maps, masks) == pytest.approx(1.0)


def test_bootstrap_ci_brackets_the_auroc_and_is_reproducible():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200), np.ones(200)].astype(int)
    scores = rng.normal(size=400) + labels
    low, high = bootstrap_auroc_ci(scores, labels, n_boot=300, seed=1)
    assert low < image_auroc(scores, labels) < high
    assert (low, high) == bootstrap_auroc_ci(scores, labels, n_boot=300, seed=1)
    small = bootstrap_auroc_ci(scores[::8], labels[::8], n_boot=300, seed=1)
    assert small[1] - small[0] > high - low
