"""GradCon and the Fisher-kernel chapter: the pieces that must be exactly right (fast, CPU).

The model, the vectorised scorer, the training loop and the probe are the chapters' own
(``nbutils.methods.gradcon`` and ``nbutils.methods.fisher_kernel``, exported from the
notebooks); the official code's training loop is the one of ``benchmarks/gradcon_speed.py``.
"""

import ast
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbutils.methods import fisher_kernel as fk
from nbutils.methods import gradcon as gc

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gradcon_speed",
                                               ROOT / "benchmarks" / "gradcon_speed.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return gc.make_model("cae_grad", 1).eval()


def test_cae_parameter_count():
    n = sum(p.numel() for p in gc.GradConCAE(1).parameters())
    assert n == 230_721  # "about 231k"
    x = torch.rand(2, 1, 28, 28)
    assert gc.GradConCAE(1)(x).shape == x.shape
    assert gc.GradConCAE(3)(torch.rand(2, 3, 28, 28)).shape == (2, 3, 28, 28)
    assert type(gc.make_model("vae", 1)) is gc.GradConVAE
    assert type(gc.make_model("cae", 3)) is gc.GradConCAE
    with pytest.raises(ValueError):
        gc.make_model("ae", 1)


def test_vectorised_gradients_equal_one_sample_loop(model):
    from nbutils.gradients import loop_gradients, per_sample_gradients

    x = torch.rand(6, 1, 28, 28)
    names = gc.GRAD_PARAMS
    assert names == [f"up.{i}.weight" for i in (0, 2, 4, 6)]
    loop = loop_gradients(model, lambda o, t: F.mse_loss(o, t), x, names)
    func = per_sample_gradients(model, lambda o, t: F.mse_loss(o, t), x, names)
    losses, grouped = gc.per_sample_decoder_grads(model, x)
    for name, g in zip(names, grouped, strict=True):
        scale = loop[name].abs().max()
        assert torch.allclose(g, loop[name], atol=1e-6 * scale, rtol=1e-4)
        assert torch.allclose(func[name], loop[name], atol=1e-6 * scale, rtol=1e-4)
    assert torch.allclose(losses, (model(x) - x).pow(2).flatten(1).mean(1), rtol=1e-5)


def test_vectorised_scores_equal_official_loop(model):
    x = torch.rand(10, 1, 28, 28)
    ref = [torch.randn_like(w) for w in gc.decoder_weights(model)]
    rec_loop, g_loop = gc.official_loop_scores(model, x, ref)
    rec_vec, g_vec = gc.gradcon_terms(model, x, ref, batch_size=4)
    np.testing.assert_allclose(rec_vec, rec_loop, rtol=1e-5)
    np.testing.assert_allclose(g_vec, g_loop, atol=1e-5)
    # known answers: against image 0's own gradient, image 0's term is -1; against its negative, +1
    _, grads = gc.per_sample_decoder_grads(model, x[:1])
    own = [g[0] for g in grads]
    assert gc.gradcon_terms(model, x[:1], own)[1][0] == pytest.approx(-1, abs=1e-5)
    assert gc.gradcon_terms(model, x[:1], [-g for g in own])[1][0] == pytest.approx(1, abs=1e-5)
    # the torch.func scorer of the speed benchmark (the Fisher chapter's gradients) too
    rec_func, g_func = bench.score_torch_func(model, x, ref, batch_size=4)
    np.testing.assert_allclose(rec_func, rec_loop, rtol=1e-5)
    np.testing.assert_allclose(g_func, g_loop, atol=1e-5)


@pytest.mark.parametrize("variant", ["cae_grad", "vae_grad"])
def test_the_chapters_float64_scorer_check(variant):
    """The check the chapter shows (``compare_scorers``), with its thresholds, on both models:
    vectorised == one image at a time == torch.func to rounding, in float64."""
    torch.manual_seed(0)
    m = gc.make_model(variant, 1).double().eval()
    x = torch.rand(12, 1, 28, 28, dtype=torch.float64)
    ref = gc.mean_train_gradient(m, torch.rand(40, 1, 28, 28, dtype=torch.float64))
    c = gc.compare_scorers(m, x, ref)
    (r_vec, g_vec), (r_loop, g_loop) = c["vectorised"], c["loop"]
    assert c["grads_vs_loop"] < 1e-8 and c["grads_vs_func"] < 1e-8
    assert np.allclose(r_vec, r_loop, rtol=1e-8, atol=1e-12)
    assert np.allclose(g_vec, g_loop, rtol=1e-8, atol=1e-10)
    assert np.ptp(g_vec) > 0  # not a degenerate case


def test_gradient_loss_zero_first_then_finite():
    torch.manual_seed(0)
    x = torch.rand(32, 1, 28, 28)
    m = gc.make_model("cae_grad", 1)
    weights = gc.decoder_weights(m)
    ref = gc.RunningMean(weights)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    grad_losses = []
    for it in range(3):  # the chapter's training iteration
        _, _, gl = gc.train_step(m, opt, ref, weights, x[it * 8:(it + 1) * 8], alpha=0.03)
        grad_losses.append(float(gl.detach()))
    assert ref.count == 3
    assert grad_losses[0] == 0.0
    assert all(np.isfinite(g) for g in grad_losses[1:])
    assert grad_losses[1] != 0.0
    # the second-order term reaches the encoder too (create_graph=True is real)
    assert all(p.grad is not None for p in m.down.parameters())
    # the chapter's visible check: zero before any history, then -1 against the batch's own
    # gradient (the VAE in eval mode decodes its mean code; in training mode it samples, and
    # its two passes' gradients differ)
    assert gc.gradient_loss_after_one_update(gc.make_model("cae_grad", 1), x[:8]) == \
        pytest.approx(-1, abs=1e-5)
    assert gc.gradient_loss_after_one_update(gc.make_model("vae_grad", 1).eval(), x[:8]) == \
        pytest.approx(-1, abs=1e-5)
    gl = gc.gradient_loss_after_one_update(gc.make_model("vae_grad", 1), x[:8])
    assert np.isfinite(gl) and -1 + 1e-3 < gl < 0


def test_the_gradient_loss_has_known_values():
    """-mean over the four layers of cos(gradient, reference): -1 against the batch's own
    gradient, +1 against its negative, 0 when two layers agree and two are reversed, and blind
    to the reference's scale per layer."""
    torch.manual_seed(0)
    m = gc.make_model("cae_grad", 1)
    x = torch.rand(8, 1, 28, 28)
    weights = gc.decoder_weights(m)
    rec = gc.recon_and_latent(m, x)[0]
    own = [g.detach() for g in torch.autograd.grad(rec, weights, retain_graph=True)]

    def gl(ref):
        return float(gc.gradient_loss(rec, weights, ref, create_graph=False))

    assert gl(own) == pytest.approx(-1, abs=1e-6)
    assert gl([-g for g in own]) == pytest.approx(1, abs=1e-6)
    assert gl([own[0], own[1], -own[2], -own[3]]) == pytest.approx(0, abs=1e-6)
    assert gl([own[0], -own[1], -own[2], -own[3]]) == pytest.approx(0.5, abs=1e-6)
    assert gl([g * s for g, s in zip(own, (1e-3, 2.0, 7.0, 1e4), strict=True)]) == \
        pytest.approx(-1, abs=1e-6)


def test_the_gradient_loss_gets_a_second_order_gradient():
    """create_graph=True: J's gradient includes the derivative through the gradient loss, so
    the training step differs from one on the reconstruction loss alone (alpha = 0)."""
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    init = gc.make_model("cae_grad", 1).state_dict()
    grads = {}
    for alpha in (0.0, 0.03):
        m = gc.make_model("cae_grad", 1)
        m.load_state_dict(init)
        weights = gc.decoder_weights(m)
        ref = gc.RunningMean(weights)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)  # weights stay: same point twice
        gc.train_step(m, opt, ref, weights, x[:8], alpha=alpha)
        gc.train_step(m, opt, ref, weights, x[8:], alpha=alpha)
        grads[alpha] = m.down[0].weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[0.03])


def test_official_and_vectorised_training_agree():
    torch.manual_seed(1)
    images = (torch.rand(64, 1, 28, 28) * 255).round().to(torch.uint8).numpy()
    x = torch.from_numpy(images.astype(np.float32) / 255)
    loader = torch.utils.data.DataLoader(bench._PerImage(images), batch_size=16, shuffle=False)
    m = gc.GradConCAE(1)
    init = {k: v.clone() for k, v in m.state_dict().items()}
    l_off = bench.train_official(m, loader, 5)
    m.load_state_dict(init)
    l_vec = bench.train_chapter(m, x, 5, batch_size=16)
    np.testing.assert_allclose(l_off, l_vec, rtol=1e-4)


def test_fisher_information_linear_gaussian_closed_form():
    """Score of x = Wz + b + N(0, s^2): autograd == closed form; MC Fisher == closed form
    (the Fisher chapter's functions)."""
    g = torch.Generator().manual_seed(0)
    d, k, s, n = 2, 2, 0.7, 100_000
    W = torch.randn(d, k, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    mu = torch.tensor([1.0, -0.5], dtype=torch.float64)
    L = torch.tensor([[1.5, 0.0], [0.3, 0.5]], dtype=torch.float64)
    z = mu + torch.randn(n, k, generator=g, dtype=torch.float64) @ L.T
    x = z @ W.T + b + s * torch.randn(n, d, generator=g, dtype=torch.float64)

    U = fk.linear_gaussian_scores({"W": W, "b": b}, x, z, s)
    assert U.shape == (n, d * (k + 1))
    # the closed form, written out here once more as the independent reference
    zt = torch.cat([z, torch.ones(n, 1, dtype=torch.float64)], 1)
    resid = (x - z @ W.T - b) / s**2
    assert torch.allclose(U, (resid[:, :, None] * zt[:, None, :]).reshape(n, -1), atol=1e-10)
    assert torch.allclose(U, fk.linear_gaussian_score_closed_form({"W": W, "b": b}, x, z, s),
                          atol=1e-10)
    second = torch.ones(k + 1, k + 1, dtype=torch.float64)
    second[:k, :k] = L @ L.T + torch.outer(mu, mu)
    second[:k, k] = second[k, :k] = mu
    F_exact = torch.kron(torch.eye(d, dtype=torch.float64), second) / s**2
    assert torch.equal(fk.linear_gaussian_fisher(mu, L, s, d), F_exact)
    F_mc = U.T @ U / n
    assert torch.linalg.norm(F_mc - F_exact) / torch.linalg.norm(F_exact) < 0.03
    z_mean = U.mean(0).abs() / (U.std(0) / np.sqrt(n))
    assert z_mean.max() < 5  # E[U] = 0 under the model
    # F = I exactly when mu = 0, Sigma = I, s = 1: the F = I kernel is then the Fisher kernel
    assert torch.allclose(fk.linear_gaussian_fisher(torch.zeros(k, dtype=torch.float64),
                                                    torch.eye(k, dtype=torch.float64), 1.0, d),
                          torch.eye(d * (k + 1), dtype=torch.float64))
    # a case worked by hand: one code dimension, z ~ N(3, 2^2), s = 0.5, two outputs:
    # E[z~ z~^T] = [[E z^2, E z], [E z, 1]] = [[4 + 9, 3], [3, 1]], F = that (x) I_2 / 0.25,
    # parameters ordered [W_1 b_1 W_2 b_2]
    hand = torch.tensor([[52.0, 12, 0, 0], [12, 4, 0, 0], [0, 0, 52, 12], [0, 0, 12, 4]],
                        dtype=torch.float64)
    assert torch.allclose(fk.linear_gaussian_fisher(torch.tensor([3.0], dtype=torch.float64),
                                                    torch.tensor([[2.0]], dtype=torch.float64),
                                                    0.5, 2), hand)
    # normalised Fisher kernel == plain cosine of whitened scores
    Uf = U[:50]
    Fi = torch.linalg.inv(F_exact)
    K = Uf @ Fi @ Uf.T
    Kn = K / torch.sqrt(torch.outer(torch.diag(K), torch.diag(K)))
    assert torch.allclose(fk.normalised_kernel(K), Kn, atol=1e-12)
    Uw = fk.whitened(Uf, F_exact)
    assert torch.allclose(Kn, F.cosine_similarity(Uw[:, None], Uw[None], dim=2), atol=1e-10)


def test_fisher_decoder_gradients_equal_the_gradcon_scorer(model):
    """The Fisher chapter's torch.func gradients are the GradCon chapter's batched ones."""
    x = torch.rand(7, 1, 28, 28)
    (losses, grads), = list(fk.decoder_gradient_batches(model, x, batch_size=16))
    ref_losses, ref_grads = gc.per_sample_decoder_grads(model, x)
    assert torch.allclose(losses, ref_losses, rtol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r.flatten(1), atol=1e-6 * float(r.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("name", ["gradcon", "fisher_kernel"])
def test_notebook_contract(name):
    """Parameters cell with the contract's names and paper defaults; no stored outputs."""
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    assert nb["cells"][0]["cell_type"] == "markdown"
    assert "".join(nb["cells"][0]["source"]).startswith("# ")
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    namespace = {node.targets[0].id: ast.literal_eval(node.value)  # plain literals only
                 for node in ast.parse("".join(tagged[0]["source"])).body
                 if isinstance(node, ast.Assign)}
    for key in ("normal_class", "dataset", "protocol", "seed", "device", "data_root",
                "profile", "record_path"):
        assert key in namespace, key
    assert namespace["dataset"] == "mnist"
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    if name == "gradcon":
        expected = {"protocol": "gradcon50", "variant": "cae_grad", "recipe": "faithful",
                    "epochs": 1000, "batch_size": 64, "lr": 1e-3, "alpha": 0.03, "beta": 0.12}
        assert {k: namespace[k] for k in expected} == expected


def _interrupting_trange(after: int):
    """A ``trange`` that raises KeyboardInterrupt once ``after`` epochs have finished."""
    trange = gc.trange

    class Interrupting:
        def __init__(self, *args, **kwargs):
            self.bar = trange(*args, **kwargs)

        def set_postfix(self, **kwargs):
            self.bar.set_postfix(**kwargs)

        def __iter__(self):
            for i, epoch in enumerate(self.bar):
                if i == after:
                    raise KeyboardInterrupt
                yield epoch
    return Interrupting


@pytest.mark.parametrize("variant", ["cae_grad", "vae_grad"])
def test_interrupted_training_resumes_exactly(tmp_path, monkeypatch, variant):
    """A run interrupted after epoch 3 and resumed from its saved state equals the
    uninterrupted run: history, snapshots (weights and references) and the final weights.
    The VAE samples from torch's global generator, so its state must travel too."""
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(100, 1, 28, 28, generator=gen, dtype=torch.float64)
    val = torch.rand(40, 1, 28, 28, generator=gen, dtype=torch.float64)
    state = tmp_path / "run.state.pt"
    config = gc.TrainConfig(seed=3, epochs=5, variant=variant, save_every=1)

    def run(path):
        torch.manual_seed(3)
        return gc.train_gradcon(gc.make_model(variant, 1).double(), train, val, config, path)

    whole = run(None)
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(gc, "trange", _interrupting_trange(3))
        run(state)
    assert torch.load(state, weights_only=True)["epoch"] == 3
    torch.manual_seed(123)  # whatever happened since: the state restores the generators
    resumed = run(state)

    assert [h["epoch"] for h in resumed[1]] == [1, 2, 3, 4, 5]
    assert resumed[1] == whole[1]
    assert resumed[0].keys() == whole[0].keys()
    for name, snap in whole[0].items():
        assert resumed[0][name]["epoch"] == snap["epoch"]
        for k, v in snap["state"].items():
            assert torch.equal(resumed[0][name]["state"][k], v), (name, k)
        for a, b in zip(resumed[0][name]["ref"], snap["ref"], strict=True):
            assert torch.equal(a, b), name


def test_mean_output_initialisation_moves_only_the_output_bias():
    """init="mean_output": the output bias becomes logit(mean pixel) per channel, nothing else
    changes, and the untrained network's output is then about as bright as the images."""
    torch.manual_seed(0)
    m = gc.make_model("cae_grad", 1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.rand(50, 1, 28, 28) ** 6  # mostly dark, as MNIST
    gc.set_output_bias_to_mean(m, x)
    after = m.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["up.6.bias"]
    assert torch.allclose(torch.sigmoid(after["up.6.bias"]), x.mean(dim=(0, 2, 3)))
    with torch.no_grad():
        assert abs(float(m(x).mean() - x.mean())) < 0.05
        assert abs(float(gc.make_model("cae_grad", 1)(x).mean()) - 0.5) < 0.1  # official: grey


@pytest.mark.parametrize(("variant", "trapped"), [("cae", True), ("vae", False)])
def test_a_saturated_sigmoid_traps_the_mse_loss_but_not_bce(variant, trapped):
    """The GradCon chapter's diagnosis 4: with every output logit far below zero, the MSE
    gradient carries sigma'(z) ~ e^z and falls below Adam's epsilon, so 50 official training
    steps leave the output bias where it was; binary cross-entropy (the VAE) has no such factor
    and moves it."""
    torch.manual_seed(0)
    m = gc.make_model(variant, 1)
    with torch.no_grad():
        m.up[-2].bias.fill_(-30.0)  # sigma(-30) ~ 1e-13: a black image
    x = (torch.rand(64, 1, 28, 28) > 0.8).float()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    weights = gc.decoder_weights(m)
    ref = gc.RunningMean(weights)
    config = gc.TrainConfig(variant=variant)
    for _ in range(50):
        gc.train_step(m, opt, ref, weights, x, config.alpha, config.use_grad_loss)
    moved = float(m.up[-2].bias.detach() + 30.0)
    if trapped:
        assert abs(moved) < 1e-6
    else:
        assert moved > 1e-2


def test_replay_of_the_first_iterations_repeats_training():
    """Diagnosis 4's replay uses the training loop's batches and steps: its iterations are
    the first iterations of ``train_gradcon`` from the same initial weights."""
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(100, 1, 28, 28, generator=gen, dtype=torch.float64)
    val = torch.rand(20, 1, 28, 28, generator=gen, dtype=torch.float64)
    config = gc.TrainConfig(seed=3, epochs=2)
    torch.manual_seed(1)
    initial = {k: v.double() for k, v in gc.make_model("cae_grad", 1).state_dict().items()}
    m = gc.make_model("cae_grad", 1).double()
    m.load_state_dict(initial)
    _, history, _ = gc.train_gradcon(m, train, val, config)
    probe = gc.replay_first_iterations(gc.make_model("cae_grad", 1).double(), initial, train,
                                       4, mean_output=False, config=config)  # 2 batches an epoch
    assert list(probe.index) == [1, 2, 3, 4]
    for epoch in (0, 1):
        mean_recon = (probe.recon.iloc[2 * epoch] * 64 + probe.recon.iloc[2 * epoch + 1] * 36) / 100
        assert mean_recon == pytest.approx(history[epoch]["train_recon"], rel=1e-12)
    assert (probe.max_abs_grad > 0).all() and np.isfinite(probe.mean_logit).all()
    # the two gradient norms: no gradient loss on the first iteration; the reconstruction
    # gradient's norm is the plain MSE gradient's at the initial weights on the first batch
    assert probe.grad_loss_grad_norm.iloc[0] == 0 and (probe.grad_loss_grad_norm.iloc[1:] > 0).all()
    m0 = gc.make_model("cae_grad", 1).double()
    m0.load_state_dict(initial)
    first = train[torch.randperm(100, generator=torch.Generator().manual_seed(3))[:64]]
    g0 = torch.autograd.grad(F.mse_loss(m0(first), first), list(m0.parameters()))
    assert probe.recon_grad_norm.iloc[0] == pytest.approx(
        float(torch.sqrt(sum((g**2).sum() for g in g0))), rel=1e-10)
    # and recording them leaves the iterations as they were
    assert list(probe.columns[:4]) == ["recon", "mean_logit", "max_logit", "max_abs_grad"]


def test_the_gradient_norms_leave_the_training_step_unchanged():
    """train_step with grad_norms: the same update as without, and the norms are those of the
    two parts of J (recon and alpha x gradient loss), each computed on its own."""
    torch.manual_seed(0)
    x = torch.rand(24, 1, 28, 28, dtype=torch.float64)
    init = gc.make_model("cae_grad", 1).double().state_dict()
    states, norms_seen = [], []
    for record in (False, True):
        m = gc.make_model("cae_grad", 1).double()
        m.load_state_dict(init)
        weights = gc.decoder_weights(m)
        ref = gc.RunningMean(weights)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        for it in range(3):
            norms = {} if record else None
            gc.train_step(m, opt, ref, weights, x[it * 8:(it + 1) * 8], 0.03, True, grad_norms=norms)
            norms_seen.append(norms)
        states.append(m.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert norms_seen[3]["grad_loss"] == 0.0 and norms_seen[3]["recon"] > 0  # no history yet
    assert norms_seen[4]["grad_loss"] > 0 and norms_seen[5]["recon"] > 0


def test_stalled_reads_validation_only():
    flat = [{"val_recon": 1.0 - 0.001 * i} for i in range(20)]
    trained = [{"val_recon": 1.0 / (1 + i)} for i in range(20)]
    assert gc.stalled(flat, 20, 0.9) and not gc.stalled(trained, 20, 0.9)
    assert not gc.stalled(flat[:19], 20, 0.9)  # not yet at the stall epoch


def test_a_stalled_run_is_restarted_and_the_restart_is_remembered(tmp_path, monkeypatch):
    """stall_epoch=1 makes every attempt but the last count as stalled: the record must come
    from the last attempt, name the stalled ones, and a second execution must train nothing."""
    import papermill as pm

    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    params = {"dataset": "digits", "normal_class": 3, "epochs": 2, "max_train": 60, "max_test": 40,
              "device": "cpu", "n_boot": 10, "recipe": "corrected", "restarts": 2,
              "stall_epoch": 1, "stall_ratio": 0.9, "probe_iterations": 5}  # restarts, not the probe
    records = []
    for run in range(2):
        record = tmp_path / f"record{run}.json"
        pm.execute_notebook(str(ROOT / "notebooks" / "gradcon.ipynb"), str(tmp_path / "out.ipynb"),
                            kernel_name="python3", progress_bar=False, cwd=str(ROOT),
                            parameters={**params, "record_path": str(record)})
        records.append(json.loads(record.read_text()))
    first, second = records
    assert first["extra"]["init_attempt"] == 2
    assert len(first["extra"]["stalled_attempts"]) == 2
    assert all(len(curve) == 1 for curve in first["extra"]["stalled_attempts"])
    assert len(first["extra"]["history"]) == 2  # the kept attempt trained all its epochs
    assert first["timings"]["train"] > 0
    ckpts = tmp_path / "ckpt" / "gradcon"
    assert len(list(ckpts.glob("*.stalled.json"))) == 2 and len(list(ckpts.glob("*.pt"))) == 1
    assert not list(ckpts.glob("*.state.pt"))
    assert second["timings"]["train"] == 0.0  # nothing retrained, stalled attempts not re-run
    assert second["extra"]["stalled_attempts"] == first["extra"]["stalled_attempts"]
    assert second["metrics"]["auroc"] == first["metrics"]["auroc"]


_FAKE_CIFAR10 = '''
# Loaded by the notebook's kernel (PYTHONPATH): torchvision's CIFAR-10 replaced by random RGB
# images in its real format (uint8, N x 32 x 32 x 3, integer targets), since the data set
# cannot be downloaded here. Everything after torchvision (nbutils and the notebook) is real.
import numpy as np
import torchvision


class FakeCIFAR10:
    def __init__(self, root, train=True, download=False, **kwargs):
        rng = np.random.default_rng(0 if train else 1)
        n = 300 if train else 200
        self.targets = [int(t) for t in np.arange(n) % 10]
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


torchvision.datasets.CIFAR10 = FakeCIFAR10
'''


def test_the_notebook_runs_on_rgb_images_in_the_cifar10_format(tmp_path, monkeypatch):
    """CIFAR-10 cannot be downloaded here, but readers who have it take this path: three
    channels resized to 28x28. The notebook must run end to end on it (model, scoring check,
    figures of RGB reconstructions, record)."""
    import os

    import papermill as pm

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_FAKE_CIFAR10)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    record = tmp_path / "record.json"
    pm.execute_notebook(str(ROOT / "notebooks" / "gradcon.ipynb"), str(tmp_path / "out.ipynb"),
                        kernel_name="python3", progress_bar=False, cwd=str(ROOT),
                        parameters={"dataset": "cifar10", "normal_class": "deer", "epochs": 1,
                                    "max_train": 24, "max_test": 40, "device": "cpu",
                                    "n_boot": 10, "probe_iterations": 3, "record_path": str(record)})
    rec = json.loads(record.read_text())
    assert rec["dataset"] == "cifar10" and rec["normal_class"] == 4
    assert 0 <= rec["metrics"]["auroc"] <= 1
    assert rec["data"]["image_shape"] == [3, 28, 28]
