"""The classic detectors of notebooks/baselines.ipynb (its ``#| export`` cells,
nbutils/methods/baselines.py): what each score computes, and that higher means more anomalous."""

import numpy as np
import pytest

from nbutils.methods import baselines as bl


def _cluster_and_outliers(seed=0):
    """Training images near one point; test images near it (label 0) and far from it (label 1)."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(0.3, 0.7, size=(1, 1, 4, 4))
    train = centre + 0.02 * rng.normal(size=(60, 1, 4, 4))
    normal = centre + 0.02 * rng.normal(size=(10, 1, 4, 4))
    anomalous = centre + rng.choice([-0.3, 0.3], size=(10, 1, 4, 4))
    return (bl.flatten_images(train), bl.flatten_images(np.concatenate([normal, anomalous])),
            np.r_[np.zeros(10), np.ones(10)])


def test_flatten_images_keeps_pixel_order_in_float64():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    flat = bl.flatten_images(x)
    assert flat.shape == (2, 12) and flat.dtype == np.float64
    np.testing.assert_array_equal(flat[1], x[1].ravel())


def test_knn_score_is_the_mean_distance_to_the_k_nearest_training_images():
    rng = np.random.default_rng(1)
    train, queries = rng.normal(size=(40, 6)), rng.normal(size=(7, 6))
    k = 4
    knn = bl.fit_knn(train, k)
    distances = np.linalg.norm(queries[:, None] - train[None], axis=2)
    expected = np.sort(distances, axis=1)[:, :k].mean(axis=1)
    np.testing.assert_allclose(bl.knn_score(knn, queries), expected, rtol=1e-12)
    # a training image is its own nearest neighbour: its score averages 0 and its k - 1 others
    own = np.linalg.norm(train[:1, None] - train[None], axis=2)
    np.testing.assert_allclose(bl.knn_score(knn, train[:1]), np.sort(own, axis=1)[:, :k].mean(axis=1))
    assert np.sort(own, axis=1)[0, 0] == 0.0


def test_pca_score_is_the_squared_distance_to_the_fitted_subspace():
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.normal(size=(8, 2)))[0]  # a 2-d subspace of R^8
    train = 3.0 + rng.normal(size=(200, 2)) @ basis.T
    pca = bl.fit_pca(train, variance=0.999, seed=0)
    assert pca.n_components_ == 2
    on_plane = 3.0 + rng.normal(size=(5, 2)) @ basis.T
    off = rng.normal(size=(5, 8))
    off_plane = on_plane + off - (off @ basis) @ basis.T  # add only components orthogonal to it
    np.testing.assert_allclose(bl.pca_score(pca, on_plane), 0.0, atol=1e-20)
    np.testing.assert_allclose(bl.pca_score(pca, off_plane), ((off_plane - on_plane) ** 2).sum(1),
                               rtol=1e-9)


@pytest.mark.parametrize("name", ["pca", "knn", "ocsvm", "iforest"])
def test_every_detector_scores_far_images_higher(name):
    train, test, labels = _cluster_and_outliers()
    fit, score = {"pca": (lambda x: bl.fit_pca(x, 0.9, seed=0), bl.pca_score),
                  "knn": (lambda x: bl.fit_knn(x, 5), bl.knn_score),
                  "ocsvm": (lambda x: bl.fit_ocsvm(x, 0.1), bl.ocsvm_score),
                  "iforest": (lambda x: bl.fit_iforest(x, 50, seed=0), bl.iforest_score)}[name]
    s = score(fit(train), test)
    assert s.shape == (len(test),)
    assert s[labels == 1].min() > s[labels == 0].max()  # every far image above every near one


def test_iforest_is_reproducible_from_its_seed():
    train, test, _ = _cluster_and_outliers()
    a = bl.iforest_score(bl.fit_iforest(train, 20, seed=3), test)
    b = bl.iforest_score(bl.fit_iforest(train, 20, seed=3), test)
    c = bl.iforest_score(bl.fit_iforest(train, 20, seed=4), test)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
