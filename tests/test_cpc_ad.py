"""CPC-AD (notebooks/cpc_ad.ipynb): the chapter's checks, run on its exported code."""

import math

import numpy as np
import pytest
import torch

from nbutils.methods.cpc_ad import (
    CPCAD,
    DIRECTIONS,
    ENCODERS,
    NORMS,
    PatchEncoder,
    encode_bank,
    extract_patches,
    grid_size,
    image_scores,
    info_nce,
    info_nce_loop,
    patch_losses,
    patch_scores,
    patches_to_map,
    rotate_grid,
    score_images,
    train_cpc,
    unrotate_grid,
)


@pytest.mark.parametrize("size,patch,stride,n", [(256, 64, 32, 7), (64, 16, 8, 7), (768, 64, 32, 23),
                                                  (128, 32, 16, 7), (64, 64, 8, 1)])
def test_grid_covers_every_pixel(size, patch, stride, n):
    assert grid_size(size, patch, stride) == n
    cover = patches_to_map(torch.ones(1, n, n, dtype=torch.float64), size, patch, stride)
    assert torch.allclose(cover, torch.ones_like(cover))


def test_grid_refuses_uncovered_pixels():
    with pytest.raises(ValueError):
        grid_size(250, 64, 32)


def test_patches_are_the_image_crops_and_spread_back_as_means():
    x = torch.rand(2, 3, 64, 64)
    p = extract_patches(x, 16, 8)
    assert p.shape == (2, 7, 7, 3, 16, 16)
    for r, c in [(0, 0), (3, 5), (6, 6)]:
        assert torch.equal(p[1, r, c], x[1, :, 8 * r:8 * r + 16, 8 * c:8 * c + 16])
    values = torch.zeros(1, 7, 7, dtype=torch.float64)
    values[0, 3, 3] = 1.0  # pixel (30, 30) is covered by patches (2..3, 2..3): mean 1/4
    m = patches_to_map(values, 64, 16, 8)
    assert float(m[0, 30, 30]) == pytest.approx(0.25)
    assert float(m[0, 0, 0]) == 0.0
    values[0, 2, 2] = float("nan")  # a patch without a value is left out of the mean
    assert float(patches_to_map(values, 64, 16, 8)[0, 30, 30]) == pytest.approx(1 / 3)


def test_info_nce_chance_perfect_and_loop():
    torch.manual_seed(0)
    b, d, h, w, n = 2, 6, 3, 4, 16
    pred = torch.randn(b, d, h, w, dtype=torch.float64)
    target = torch.randn(b, d, h, w, dtype=torch.float64)
    same = target.permute(0, 2, 3, 1)[..., None, :].expand(b, h, w, n, d)
    assert torch.allclose(info_nce(pred, target, same), torch.full((b, h, w), math.log(n + 1),
                                                                   dtype=torch.float64))
    neg = torch.randn(b, h, w, n, d, dtype=torch.float64)
    assert float(info_nce(50 * target, target, 0.01 * neg).max()) < 1e-6
    assert torch.allclose(info_nce(pred, target, neg), info_nce_loop(pred, target, neg), atol=1e-12)


@pytest.mark.parametrize("direction,step", [("down", (1, 0)), ("up", (-1, 0)), ("left", (0, -1)),
                                            ("right", (0, 1))])
def test_rotation_turns_each_direction_into_down(direction, step):
    coords = torch.stack(torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij"))[None]
    r = rotate_grid(coords, direction)
    for i, j in [(0, 0), (2, 3), (3, 1)]:
        assert tuple(int(v) for v in r[0, :, i + 1, j] - r[0, :, i, j]) == step
    assert torch.equal(unrotate_grid(r, direction), coords)


def test_losses_land_on_the_predicted_patches():
    torch.manual_seed(0)
    model = CPCAD("resnet18", "layer", prediction_steps=2)
    n = 5
    grids = [torch.randn(1, model.dim, n, n)]
    banks = [torch.randn(40, model.dim)]
    losses = patch_losses(model, grids, banks, 4, skip=1)
    down = losses["down"]  # step k (0-based) predicts rows >= k + 2
    assert torch.isnan(down[0, 0, :2]).all() and not torch.isnan(down[0, 0, 2:]).any()
    assert torch.isnan(down[0, 1, :3]).all() and not torch.isnan(down[0, 1, 3:]).any()
    right = losses["right"]  # predicted from the left: the first two columns get nothing
    assert torch.isnan(right[0, 0, :, :2]).all() and not torch.isnan(right[0, 0, :, 2:]).any()
    up = losses["up"]
    assert torch.isnan(up[0, 0, -2:]).all() and not torch.isnan(up[0, 0, :-2]).any()
    scores = patch_scores(losses)  # four directions: every patch is predicted from some side
    assert scores.shape == (1, n, n) and not torch.isnan(scores).any()


@pytest.mark.parametrize("name", ENCODERS)
def test_encoders_from_torchvision_without_batch_norm(name):
    enc = PatchEncoder(name, "layer")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    assert enc(torch.rand(2, 3, 3, 32, 32)).shape == (2, 3, enc.dim)
    assert enc.dim == (256 if name == "resnet18" else 1024)


@pytest.mark.parametrize("norm", NORMS)
def test_a_patch_encoding_depends_on_its_batch_only_with_batch_norm(norm):
    torch.manual_seed(0)
    enc = PatchEncoder("resnet18", norm).train()
    patches = torch.rand(6, 3, 32, 32)
    alone = enc(torch.cat([patches[:1], torch.rand(5, 3, 32, 32)]))[:1]
    assert torch.allclose(enc(patches)[:1], alone, atol=1e-5) == (norm != "batch")


def _tiny_data():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((6, 3, 32, 32), dtype=np.float32))
    return x[:4], x[4:]


def test_training_resumes_exactly_from_its_checkpoint(tmp_path):
    x_train, x_val = _tiny_data()
    kw = dict(batch_size=2, lr=1e-3, patch_size=8, patch_stride=4, n_negatives=4, skip=1, seed=0,
              bank_images=4)

    def model():
        torch.manual_seed(0)
        return CPCAD("resnet18", "layer", prediction_steps=2)

    straight = train_cpc(model(), x_train, x_val, epochs=2, ckpt_path=tmp_path / "a.pt",
                         snapshot_epochs=(1,), **kw)
    m = model()
    train_cpc(m, x_train, x_val, epochs=1, ckpt_path=tmp_path / "b.pt", snapshot_epochs=(1,), **kw)
    resumed = train_cpc(model(), x_train, x_val, epochs=2, ckpt_path=tmp_path / "b.pt",
                        snapshot_epochs=(1,), **kw)
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    assert set(resumed["snapshots"]) == {1} and resumed["best"]["epoch"] in (1, 2)
    # a finished checkpoint skips training
    again = train_cpc(model(), x_train, x_val, epochs=2, ckpt_path=tmp_path / "b.pt", **kw)
    assert len(again["history"]) == 2


def test_scores_maps_and_pooling():
    x_train, _ = _tiny_data()
    torch.manual_seed(0)
    model = CPCAD("resnet18", "layer", prediction_steps=2)
    bank = encode_bank(model, x_train, 8, 4, 2)
    assert bank[0].shape == (4 * 7 * 7, model.dim)
    patch, maps = score_images(model, x_train[:3], bank, patch_size=8, patch_stride=4,
                               n_negatives=4, skip=1, batch_size=2, seed=0)
    assert patch.shape == (3, 7, 7) and maps.shape == (3, 32, 32) and np.isfinite(maps).all()
    again, _ = score_images(model, x_train[:3], bank, patch_size=8, patch_stride=4,
                            n_negatives=4, skip=1, batch_size=2, seed=0)
    np.testing.assert_array_equal(patch, again)  # the negatives' draw is fixed by the seed
    pooled = image_scores(patch)
    np.testing.assert_allclose(pooled["mean"], patch.reshape(3, -1).mean(1), rtol=1e-6)
    np.testing.assert_allclose(pooled["max"], patch.reshape(3, -1).max(1))
    assert (pooled["top10"] <= pooled["max"] + 1e-9).all() and (pooled["top10"] >= pooled["mean"] - 1e-9).all()


def test_separate_encoders_per_direction():
    model = CPCAD("resnet18", "layer", directions=("down", "right"), shared_encoder=False)
    assert len(model.encoders) == 2 and set(model.predictors) == {"down", "right"}
    with pytest.raises(ValueError):
        CPCAD("resnet18", "layer", directions=("diagonal",))
    assert set(DIRECTIONS) == {"down", "up", "left", "right"}


def test_pooling_leaves_out_patches_no_prediction_reaches():
    torch.manual_seed(0)
    model = CPCAD("resnet18", "layer", directions=("down", "right"), prediction_steps=2)
    n = 5
    scores = patch_scores(patch_losses(model, [torch.randn(3, model.dim, n, n)],
                                       [torch.randn(30, model.dim)], 4, skip=1)).detach().numpy()
    assert np.isnan(scores[:, 0, 0]).all()  # neither from above nor from the left
    pooled = image_scores(scores)
    valid = scores[:, ~np.isnan(scores).any(0)]
    assert all(np.isfinite(v).all() for v in pooled.values())
    np.testing.assert_allclose(pooled["mean"], valid.mean(1), rtol=1e-6)
