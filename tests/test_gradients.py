import pytest
import torch
import torch.nn.functional as F

from nbutils.config import get_device, seed_everything
from nbutils.gradients import (
    cosine_to_reference,
    flatten_gradients,
    loop_gradients,
    per_sample_gradients,
    relative_error,
)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 16),
                               torch.nn.Unflatten(1, (1, 4, 4)), torch.nn.Sigmoid())


def _mse(out, x):
    return ((out - x) ** 2).mean()


def test_vectorised_gradients_equal_the_loop():
    model, x = _model(), torch.rand(10, 1, 4, 4)
    names = ["0.weight", "3.weight", "3.bias"]
    fast = per_sample_gradients(model, _mse, x, names, batch_size=4)
    slow = loop_gradients(model, _mse, x, names)
    for n in names:
        assert fast[n].shape == (10, *dict(model.named_parameters())[n].shape)
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-5, atol=1e-7)
    assert flatten_gradients(fast).shape == (10, 3 * 9 + 48 * 16 + 16)


def test_gradients_differ_between_samples_and_unknown_names_fail():
    model, x = _model(), torch.rand(3, 1, 4, 4)
    g = flatten_gradients(per_sample_gradients(model, _mse, x))
    assert not torch.allclose(g[0], g[1])
    with pytest.raises(KeyError, match="no parameters"):
        per_sample_gradients(model, _mse, x, ["nope.weight"])


def test_seeding_and_device():
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    assert get_device("cpu").type == "cpu" and get_device("auto").type in {"cpu", "cuda", "mps"}


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from nbutils.config import save_checkpoint

    path = save_checkpoint({"w": torch.ones(2)}, tmp_path / "a" / "model.pt")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))

    def crash(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"w": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]


@pytest.mark.parametrize("row_scale,ref_scale", [(1.0, 1.0), (1e-6, 1e-4), (1e-9, 1.0), (0.0, 1.0)])
def test_cosine_to_reference_matches_torch_cosine_similarity(row_scale, ref_scale):
    # Regression: clamping the product of the norms at 1e-8 shrank the cosine of small
    # gradients (norms 1e-6 x 1e-4) and broke GradCon's vectorised-vs-loop check.
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 3, 4, 4, generator=gen) * row_scale
    ref = torch.randn(3, 4, 4, generator=gen) * ref_scale
    expected = torch.stack([F.cosine_similarity(r.reshape(1, -1), ref.reshape(1, -1))[0] for r in rows])
    got = cosine_to_reference(rows, ref)
    assert got.shape == (7,)
    assert torch.allclose(got, expected, atol=1e-6), (got, expected)
    if row_scale == 1e-6:
        assert got.abs().max() > 0.05  # not squashed towards zero


def test_relative_error_handles_all_zero_gradients():
    z, g = torch.zeros(2, 3), torch.tensor([[1.0, -2.0, 0.0], [0.0, 4.0, 0.5]])
    assert relative_error(z, z) == 0.0  # a dead decoder: both ways give zeros, they agree
    assert relative_error(g, z) == float("inf")
    assert relative_error(g, g) == 0.0
    assert relative_error(g + 0.04, g) == pytest.approx(0.01)
