"""The PatchCore-style baseline (notebooks/patchcore.ipynb): its checks, on its exported code."""

import numpy as np
import pytest
import torch

from nbutils.methods.patchcore import (
    anomaly_maps,
    as_bank,
    covering_radius,
    greedy_coreset,
    nearest_distances,
    patch_distances,
    patch_features,
)


@pytest.mark.parametrize("chunk", [0, 1, 7, 1000])
def test_nearest_distances_are_the_definition(chunk):
    gen = torch.Generator().manual_seed(0)
    q, bank = torch.randn(50, 16, generator=gen), torch.randn(300, 16, generator=gen)
    loop = torch.stack([((bank - x) ** 2).sum(1).sqrt().min() for x in q])
    assert torch.allclose(nearest_distances(q, bank, chunk), loop, atol=1e-4)
    # a bank member is at distance 0 (exactly: the rounded matrix-product distance only picks it)
    assert float(nearest_distances(bank[:5], bank).max()) < 1e-6


def test_greedy_coreset_takes_one_point_of_each_cluster_first():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 32, generator=gen) * 50
    points = (centres[:, None] + 0.01 * torch.randn(6, 40, 32, generator=gen)).reshape(-1, 32)
    for projection in (0, 8):
        chosen = greedy_coreset(points, 6, projection_dim=projection, seed=1)
        assert len(set(chosen.tolist())) == 6
        assert sorted(int(i) // 40 for i in chosen) == list(range(6))
        assert covering_radius(points, points[chosen]) < 1.0


def test_greedy_coreset_covers_better_than_a_random_subset():
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(900, 24, generator=gen), 6 + torch.randn(100, 24, generator=gen)])
    greedy = points[greedy_coreset(points, 50, projection_dim=0, seed=0)]
    random = points[torch.randperm(len(points), generator=gen)[:50]]
    assert covering_radius(points, greedy) < covering_radius(points, random)


def test_maps_are_upsampled_smoothed_distances():
    d = torch.zeros(2, 8, 8)
    d[0, 2, 5] = 1.0
    raw = anomaly_maps(d, 64, sigma=0)
    smooth = anomaly_maps(d, 64, sigma=4)
    assert raw.shape == smooth.shape == (2, 64, 64) and float(np.abs(raw[1]).max()) == 0.0
    y, x = np.unravel_index(smooth[0].argmax(), smooth[0].shape)
    assert 16 <= y < 24 and 40 <= x < 48  # the peak stays on the patch's eighth of the image
    assert smooth[0].max() < raw[0].max()
    assert smooth[0].sum() == pytest.approx(raw[0].sum(), rel=1e-3)  # smoothing keeps the mass


def test_lite0_patch_features_and_scores_on_a_stride_8_grid():
    from nbutils.methods.efficientad import make_extractor

    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    f = patch_features(make_extractor("efficientnet_lite0"), x, feature_dim=384, batch_size=2)
    assert f.shape == (3, 384, 8, 8)
    bank = as_bank(f[:2])
    assert bank.shape == (128, 384) and torch.equal(bank[9], f[0, :, 1, 1])
    d = patch_distances(f, bank)
    assert d.shape == (3, 8, 8) and float(d[:2].max()) < 1e-5 and float(d[2].min()) > 0
