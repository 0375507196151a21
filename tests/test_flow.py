"""The Glow of notebooks/flow_llr.ipynb: invertible, exact log-determinant, consistent scales.

The model lives in the notebook, so the tests execute the notebook's cells tagged ``model``
(and the visible ``check`` cells) and test the very code the reader sees.
"""

from pathlib import Path

import nbformat
import pytest
import torch

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "flow_llr.ipynb"


def _cells(tag: str) -> list[str]:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


@pytest.fixture(scope="module")
def ns() -> dict:
    namespace: dict = {}
    sources = _cells("model")
    assert sources, "no cells tagged 'model' in flow_llr.ipynb"
    for source in sources:
        exec(compile(source, str(NOTEBOOK), "exec"), namespace)
    return namespace


def _tiny(ns, in_channels=1, levels=2, steps=2, hidden=8, side=8, dtype=torch.float32):
    torch.manual_seed(1)
    model = ns["Glow"](in_channels, levels, steps, hidden).to(dtype)
    with torch.no_grad():
        model(torch.rand(32, in_channels, side, side, dtype=dtype) - 0.5)  # ActNorm init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_notebook_check_cells_pass(ns):
    for source in _cells("check"):
        exec(compile(source, str(NOTEBOOK), "exec"), dict(ns))  # their asserts must hold


@pytest.mark.parametrize("in_channels,levels,side", [(1, 2, 8), (3, 3, 8), (1, 3, 16)])
def test_inverse_of_forward_is_identity(ns, in_channels, levels, side):
    model = _tiny(ns, in_channels, levels, side=side)
    x = torch.rand(5, in_channels, side, side) - 0.5
    with torch.no_grad():
        zs, _, _ = model(x)
        assert sum(z[0].numel() for z in zs) == x[0].numel()  # a bijection keeps dimensions
        assert (model.inverse(zs) - x).abs().max().item() < 1e-4


def test_logdet_matches_autograd(ns):
    model = _tiny(ns, in_channels=3, levels=2, side=4, dtype=torch.float64)
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64) - 0.5

    def latents(flat):
        zs, _, _ = model(flat.view(1, 3, 4, 4))
        return torch.cat([z.flatten() for z in zs])

    jac = torch.autograd.functional.jacobian(latents, x.flatten())
    expected = torch.linalg.slogdet(jac)[1].item()
    with torch.no_grad():
        _, logdets, _ = model(x)
    assert logdets.sum().item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_layers_invert_and_squeeze_roundtrip(ns):
    torch.manual_seed(2)
    x = torch.randn(4, 4, 6, 6)
    for layer in (ns["ActNorm"](4), ns["InvConv1x1"](4), ns["AffineCoupling"](4, 8)):
        with torch.no_grad():
            layer(x)  # initialise ActNorm
            for p in layer.parameters():
                p.add_(0.1 * torch.randn_like(p))
            y, logdet = layer(x)
            assert logdet.shape == (4,)
            assert torch.allclose(layer.inverse(y), x, atol=1e-5)
    assert torch.equal(ns["unsqueeze"](ns["squeeze"](x)), x)


def test_contributions_sum_to_log_likelihood_and_bpd(ns):
    model = _tiny(ns)
    x_u8 = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    x = ns["dequantise"](x_u8, torch.full(x_u8.shape, 0.5))
    assert x.min() >= -0.5 and x.max() < 0.5
    with torch.no_grad():
        zs, logdets, logpriors = model(x)
        contrib = model.contributions(x)
    assert contrib.shape == (6, 2)
    assert torch.allclose(contrib.sum(1), (logdets + logpriors).sum(1))
    # uniform density on [-0.5, 0.5)^D has log p = 0 -> exactly 8 bits per dimension
    assert ns["bits_per_dim"](0.0, 64) == pytest.approx(8.0)
