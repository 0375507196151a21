"""The Glow of notebooks/flow_llr.ipynb: invertible, exact log-determinant, a normalised prior.

The model and its checks are the notebook's ``#| export`` cells (nbutils/methods/flow_llr.py):
the notebook's visible check cells and these tests call the same functions. The tests also break
the model on purpose and require the checks to notice.
"""

import math

import numpy as np
import pytest
import torch

from nbutils.methods import flow_llr as fl


def _tiny(in_channels=1, levels=2, steps=2, hidden=8, side=8, dtype=torch.float32):
    torch.manual_seed(1)
    model = fl.Glow(in_channels, levels, steps, hidden).to(dtype)
    return fl.perturbed(model, torch.rand(32, in_channels, side, side, dtype=dtype) - 0.5)


def _small():
    """The notebook's third check's setting: 1x4x4 images (D = 16), two levels, float64."""
    torch.manual_seed(3)
    model = _tiny(levels=2, side=4, dtype=torch.float64)
    return model, torch.rand(1, 1, 4, 4, dtype=torch.float64) - 0.5


@pytest.mark.parametrize("in_channels,levels,side", [(1, 2, 8), (3, 3, 8), (1, 3, 16)])
def test_inverse_of_forward_is_identity(in_channels, levels, side):
    model = _tiny(in_channels, levels, side=side)
    x = torch.rand(5, in_channels, side, side) - 0.5
    with torch.no_grad():
        zs, _, _ = model(x)
    assert sum(z[0].numel() for z in zs) == x[0].numel()  # a bijection keeps dimensions
    assert fl.inverse_error(model, x) < 1e-4


@pytest.mark.parametrize("in_channels,levels,side", [(1, 2, 4), (3, 2, 4)])
def test_logdet_matches_autograd(in_channels, levels, side):
    model = _tiny(in_channels, levels, side=side, dtype=torch.float64)
    x = torch.rand(1, in_channels, side, side, dtype=torch.float64) - 0.5
    assert fl.logdet_error(model, x) < 1e-6


def test_each_level_prior_has_unit_mass():
    model, x = _small()
    masses = fl.prior_masses(model, x)
    assert len(masses) == 2
    assert all(abs(m - 1.0) < 1e-6 for m in masses)


def _gaussian_without_constant(z, mean, log_std):
    lp = -0.5 * (2 * log_std + (z - mean) ** 2 * torch.exp(-2 * log_std))
    return lp.flatten(1).sum(1)


def _gaussian_with_log_std_sign_flipped(z, mean, log_std):
    lp = -0.5 * (math.log(2 * math.pi) - 2 * log_std + (z - mean) ** 2 * torch.exp(-2 * log_std))
    return lp.flatten(1).sum(1)


def _gaussian_whose_mean_reads_z(z, mean, log_std):
    """What a prior conditioned on the half it models (z) rather than the half that goes on
    (h) looks like: not a density over z."""
    lp = -0.5 * (math.log(2 * math.pi) + 2 * log_std
                 + (z - mean - 0.5 * z) ** 2 * torch.exp(-2 * log_std))
    return lp.flatten(1).sum(1)


@pytest.mark.parametrize("broken", [_gaussian_without_constant, _gaussian_with_log_std_sign_flipped,
                                    _gaussian_whose_mean_reads_z])
def test_prior_mass_check_catches_a_wrong_gaussian(monkeypatch, broken):
    model, x = _small()
    monkeypatch.setattr(fl, "gaussian_log_prob", broken)
    masses = fl.prior_masses(model, x, half_width=30.0, n_grid=301)  # coarse: errors are large
    assert max(abs(m - 1.0) for m in masses) > 0.1


def test_logdet_check_catches_a_wrong_logdet(monkeypatch):
    model, x = _small()
    original = fl.InvConv1x1.forward

    def doubled(self, x_in):
        y, logdet = original(self, x_in)
        return y, 2 * logdet

    assert fl.logdet_error(model, x) < 1e-6
    monkeypatch.setattr(fl.InvConv1x1, "forward", doubled)
    assert fl.logdet_error(model, x) > 1e-3


def test_layers_invert_and_squeeze_roundtrip():
    torch.manual_seed(2)
    x = torch.randn(4, 4, 6, 6)
    for layer in (fl.ActNorm(4), fl.InvConv1x1(4), fl.AffineCoupling(4, 8)):
        with torch.no_grad():
            layer(x)  # initialise ActNorm
            for p in layer.parameters():
                p.add_(0.1 * torch.randn_like(p))
            y, logdet = layer(x)
            assert logdet.shape == (4,)
            assert torch.allclose(layer.inverse(y), x, atol=1e-5)
    assert torch.equal(fl.unsqueeze(fl.squeeze(x)), x)


def test_dequantise_and_bits_per_dim():
    x_u8 = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    x = fl.dequantise(x_u8, torch.full(x_u8.shape, 0.5))
    assert x.min() >= -0.5 and x.max() < 0.5
    assert torch.allclose((x + 0.5) * 256 - 0.5, x_u8.float())  # bin centres
    # uniform density on [-0.5, 0.5)^D has log p = 0 -> exactly 8 bits per dimension
    assert fl.bits_per_dim(0.0, 64) == pytest.approx(8.0)
    # a density twice as high everywhere saves one bit per image, 1/D per dimension
    assert fl.bits_per_dim(math.log(2.0), 64) == pytest.approx(8.0 - 1 / 64)


def test_log_likelihoods_are_per_level_and_deterministic():
    model = _tiny()
    images = np.random.default_rng(0).integers(0, 256, (7, 1, 8, 8), dtype=np.uint8)
    c1 = fl.log_likelihoods(model, images, chunk=3)
    c2 = fl.log_likelihoods(model, images, chunk=7)
    assert c1.shape == (7, 2) and np.all(np.isfinite(c1))
    np.testing.assert_allclose(c1, c2, rtol=1e-6)  # one fixed noise draw per image, any chunking


def test_scores_are_oriented_and_complete():
    rng = np.random.default_rng(0)
    c_in, c_g = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    s = fl.flow_scores(c_in, c_g, png=np.zeros(5), n_dims=64)
    assert set(s) == {"raw", "last_scale", "png", "ratio", *(f"scale{i}" for i in (1, 2, 3)),
                      *(f"ratio.scale{i}" for i in (1, 2, 3))}
    np.testing.assert_allclose(s["raw"], -c_in.sum(1))  # less likely = more anomalous
    np.testing.assert_allclose(s["ratio"], s["ratio.scale1"] + s["ratio.scale2"] + s["ratio.scale3"])
    # the PNG score is the flow's code length in bits minus the PNG's
    np.testing.assert_allclose(s["png"], fl.bits_per_dim(c_in.sum(1), 64) * 64)


def test_outlier_loss_pushes_outliers_below_the_general_model():
    log_pg = torch.zeros(4)
    low = fl.outlier_loss(torch.full((4,), -50.0), log_pg, weight=10.0, temperature=5.0)
    high = fl.outlier_loss(torch.full((4,), 50.0), log_pg, weight=10.0, temperature=5.0)
    assert low.item() < 1e-3 < high.item()
    assert high.item() == pytest.approx(10.0 * (10.0 + math.log1p(math.exp(-10.0))))


def test_train_flow_lowers_bits_per_dim():
    rng = np.random.default_rng(0)
    base = rng.integers(100, 156, (1, 1, 8, 8))
    data = np.clip(base + rng.integers(-3, 4, (64, 1, 8, 8)), 0, 255).astype(np.uint8)
    torch.manual_seed(0)
    model = fl.Glow(1, 2, 1, 8)
    history = fl.train_flow(model, data, 3, lr=5e-3, weight_decay=0.0, batch_size=16,
                            warmup_steps=1, desc="test")
    assert len(history) == 3 and history[-1] < history[0]


def _train(data, n_epochs=None, **kwargs):
    torch.manual_seed(0)
    model = fl.Glow(1, 2, 1, 8)
    fl.train_flow(model, data, n_epochs, lr=5e-3, weight_decay=1e-4, batch_size=16,
                  warmup_steps=1, desc="test", **kwargs)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 8, 8)).astype(np.uint8)


def test_train_flow_max_steps_counts_optimiser_steps():
    """Equal terms between models rest on max_steps: 2 epochs of 4 batches are 8 steps."""
    data = _images(64)
    two_epochs = _train(data, 2)
    assert torch.equal(_train(data, max_steps=8), two_epochs)
    assert torch.equal(_train(data, 5, max_steps=8), two_epochs)  # max_steps overrides n_epochs
    assert not torch.equal(_train(data, max_steps=7), two_epochs)
    assert not torch.equal(_train(data, max_steps=9), two_epochs)
    assert torch.equal(_train(data, 2), two_epochs)  # same seed, same weights


def test_outlier_control_sees_the_same_normal_batches():
    """With a zero outlier weight the outlier run is exactly the control: the outliers are drawn
    from their own generators and leave the normal batches and their noise unchanged."""
    data, outliers = _images(64), _images(40, seed=1)
    torch.manual_seed(5)
    general = fl.Glow(1, 2, 1, 8)
    general(fl.dequantise(torch.from_numpy(outliers)))  # initialise its ActNorm
    control = _train(data, 2)
    zero = _train(data, 2, outlier=(general, outliers, 0.0, 10.0))
    assert torch.equal(zero, control)
    assert not torch.equal(_train(data, 2, outlier=(general, outliers, 50.0, 10.0)), control)
