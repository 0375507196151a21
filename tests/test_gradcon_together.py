"""nbutils.methods.gradcon_together trains G models at once; each must be the chapter's run.

The reference is the GradCon chapter's own ``train_gradcon`` (``nbutils.methods.gradcon``,
exported from notebooks/gradcon.ipynb), run once per model. Classes of different sizes make
the groups' epochs end at different iterations, which the grouped trainer must handle exactly.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nbutils.methods import gradcon as gc
from nbutils.methods import gradcon_together as together

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "gradcon.ipynb"


SEEDS, EPOCHS = [3, 5], 6


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(train, val) of two models. Sizes give epochs of 3 and 2 iterations, both with a short
    last batch; float64, so that rounding (which Adam amplifies on tiny gradients) cannot hide
    a logic error."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand(n_train, 1, 28, 28, generator=gen, dtype=torch.float64),
             torch.rand(n_val, 1, 28, 28, generator=gen, dtype=torch.float64))
            for n_train, n_val in ((150, 70), (100, 40))]


_REFERENCES: dict[str, tuple] = {}


def _config(seed: int, variant: str = "cae_grad", **kwargs) -> gc.TrainConfig:
    """The chapter's training parameters for the test runs (official batch size, lr, alpha)."""
    return gc.TrainConfig(seed=seed, epochs=EPOCHS, variant=variant, **kwargs)


def _models_and_reference(variant: str):
    """Initial models (and, for VAEs, where each one's noise starts) and the chapter's
    uninterrupted runs of them (computed once per variant)."""
    if variant not in _REFERENCES:
        models, noise_states, reference = [], [], []
        for (train, val), seed in zip(_data(), SEEDS, strict=True):
            torch.manual_seed(seed)
            models.append(gc.make_model(variant, 1).double())
            noise_states.append(torch.get_rng_state())
            torch.manual_seed(seed)
            reference.append(gc.train_gradcon(gc.make_model(variant, 1).double(), train, val,
                                              _config(seed, variant))[:2])
        _REFERENCES[variant] = models, noise_states, reference
    return _REFERENCES[variant]


def _together(models, noise_states, variant: str, grouped: bool, **kwargs):
    """The trainer's ``train_together`` on the test data."""
    data = _data()
    return together.train_together(
        models, [d[0] for d in data], [d[1] for d in data], SEEDS, epochs=EPOCHS,
        use_grad_loss=variant.endswith("_grad"), progress=False, grouped=grouped,
        noise_states=noise_states, **kwargs)


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    models, noise_states, reference = _models_and_reference("cae_grad")
    snaps, histories = _together(models, noise_states, "cae_grad", grouped=True)
    return reference, snaps, histories


def test_histories_equal_the_notebook_loop(runs):
    reference, _, histories = runs
    for (_, ref_history), history in zip(reference, histories, strict=True):
        assert len(history) == len(ref_history)
        for ours, theirs in zip(history, ref_history, strict=True):
            assert ours.keys() == theirs.keys()
            for k in ours:
                assert ours[k] == pytest.approx(theirs[k], rel=1e-8, abs=1e-10), (k, ours, theirs)


def test_snapshots_equal_the_notebook_loop(runs):
    reference, snaps, _ = runs
    for (ref_snaps, _), ours in zip(reference, snaps, strict=True):
        assert ours.keys() == ref_snaps.keys() == {"faithful", "corrected", "last"}
        for name in ours:
            assert ours[name]["epoch"] == ref_snaps[name]["epoch"]
            for k, v in ref_snaps[name]["state"].items():
                assert torch.allclose(ours[name]["state"][k], v, atol=1e-10, rtol=1e-7), (name, k)
            for a, b in zip(ours[name]["ref"], ref_snaps[name]["ref"], strict=True):
                assert a.shape == b.shape
                assert torch.allclose(a, b, atol=1e-12, rtol=1e-7), name


def test_models_actually_trained_and_differ(runs):
    _, snaps, histories = runs
    for h in histories:
        assert h[-1]["train_recon"] < h[0]["train_recon"]
    a, b = (s["last"]["state"]["up.6.weight"] for s in snaps)
    assert not torch.allclose(a, b)


def test_masked_adam_equals_torch_adam_and_skips_inactive_groups():
    gen = torch.Generator().manual_seed(0)
    p_ours = torch.randn(2 * 3, 4, generator=gen)
    p_torch = p_ours[:3].clone().requires_grad_(True)
    p_ours.requires_grad_(True)
    opt = together.FlatMaskedAdam([p_ours], groups=2, lr=1e-2)
    ref_opt = torch.optim.Adam([p_torch], lr=1e-2)
    frozen = p_ours[3:].detach().clone()
    for _ in range(5):
        g = torch.randn(3, 4, generator=gen)
        p_ours.grad = torch.cat([g, torch.randn(3, 4, generator=gen)])
        p_torch.grad = g.clone()
        opt.step(torch.tensor([True, False]))
        ref_opt.step()
    assert torch.allclose(p_ours[:3], p_torch, atol=1e-6)
    assert torch.equal(p_ours[3:].detach(), frozen)  # the inactive group never moved
    assert np.allclose(opt.steps.squeeze(1).numpy(), [5, 0])


@pytest.mark.parametrize("variant", ["cae_grad", "vae"])
def test_the_notebook_finds_the_checkpoint_and_only_scores(tmp_path, monkeypatch, variant):
    import json

    import papermill as pm

    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    common = {"dataset": "digits", "epochs": 1, "max_train": 60, "max_test": 40, "variant": variant}
    assert together.main(["--dataset", "digits", "--classes", "3", "--seeds", "0",
                                "--epochs", "1", "--max-train", "60", "--max-test", "40",
                                "--device", "cpu", "--variant", variant]) == 0
    assert len(list((tmp_path / "ckpt" / "gradcon").glob("*.pt"))) == 1
    record = tmp_path / "record.json"
    pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "out.ipynb"), kernel_name="python3",
                        progress_bar=False, cwd=str(ROOT),
                        parameters={**common, "normal_class": 3, "seed": 0, "device": "cpu",
                                    "n_boot": 10, "probe_iterations": 5,
                                    "record_path": str(record)})
    rec = json.loads(record.read_text())
    assert rec["extra"]["trainer"]["name"] == "nbutils.methods.gradcon_together"
    assert rec["timings"]["train"] == 0.0  # training skipped: the notebook only scored


def test_side_by_side_runs_equal_the_notebook_loop(runs):
    # the GPU default: one trainer (stream) per model, their epochs interleaved
    reference, _, _ = runs
    models, noise_states, _ = _models_and_reference("cae_grad")
    snaps, histories = _together(models, noise_states, "cae_grad", grouped=False)
    _assert_equal_runs(reference, snaps, histories)


@pytest.mark.parametrize("variant,grouped", [("vae_grad", True), ("vae", False)])
def test_vaes_equal_the_notebook_loop(variant, grouped):
    """The VAEs add fully connected layers, BCE, the KL term and sampling noise. Each model's
    noise generator starts where the notebook's global one stands after making the model."""
    torch.set_num_threads(1)
    models, noise_states, reference = _models_and_reference(variant)
    snaps, histories = _together(models, noise_states, variant, grouped)
    for (ref_snaps, _), s, h in zip(reference, snaps, histories, strict=True):
        assert h[-1]["train_recon"] < h[0]["train_recon"]  # it trained
        for name in ("faithful", "corrected", "last"):
            assert s[name]["state"].keys() == ref_snaps[name]["state"].keys()
    _assert_equal_runs(reference, snaps, histories)


# --- interrupted runs: states in the notebook's .state.pt format, continued by either side ---

STOP = 3  # the epoch after which a run is interrupted (its state saved, then stopped)


class Interrupted(Exception):
    pass


def _assert_equal_runs(reference, snaps, histories):
    for (ref_snaps, ref_history), s, h in zip(reference, snaps, histories, strict=True):
        assert len(h) == len(ref_history) == EPOCHS
        for ours, theirs in zip(h, ref_history, strict=True):
            assert ours == pytest.approx(theirs, rel=1e-8, abs=1e-10)
        assert s.keys() == ref_snaps.keys() == {"faithful", "corrected", "last"}
        for name in s:
            assert s[name]["epoch"] == ref_snaps[name]["epoch"]
            for k, v in ref_snaps[name]["state"].items():
                assert torch.allclose(s[name]["state"][k], v, atol=1e-10, rtol=1e-7), (name, k)
            for a, b in zip(s[name]["ref"], ref_snaps[name]["ref"], strict=True):
                assert torch.allclose(a, b, atol=1e-12, rtol=1e-7), name


def _interrupted_together(models, noise_states, variant, grouped) -> list[dict]:
    """Train together with a state every STOP epochs; stop once every model has saved one."""
    saved: dict[int, dict] = {}

    def on_state(i: int, state: dict) -> None:
        saved[i] = state
        if len(saved) == len(models):
            raise Interrupted

    with pytest.raises(Interrupted):
        _together(models, noise_states, variant, grouped, save_every=STOP, on_state=on_state)
    assert [saved[i]["epoch"] for i in range(len(models))] == [STOP] * len(models)
    return [saved[i] for i in range(len(models))]


@pytest.mark.parametrize("variant,grouped", [("cae_grad", True), ("cae_grad", False),
                                             ("vae_grad", True)])
def test_an_interrupted_run_continues_to_the_uninterrupted_one(variant, grouped):
    torch.set_num_threads(1)
    models, noise_states, reference = _models_and_reference(variant)
    states = _interrupted_together(models, noise_states, variant, grouped)
    snaps, histories = _together(models, noise_states, variant, grouped, states=states)
    _assert_equal_runs(reference, snaps, histories)


def test_the_notebook_continues_a_state_written_here(tmp_path):
    from nbutils.config import save_checkpoint

    torch.set_num_threads(1)
    models, noise_states, reference = _models_and_reference("cae_grad")
    states = _interrupted_together(models, noise_states, "cae_grad", grouped=True)
    for (train, val), seed, state, ref in zip(_data(), SEEDS, states, reference, strict=True):
        path = save_checkpoint(state, tmp_path / f"seed{seed}.state.pt")
        torch.manual_seed(seed)
        snaps, history = gc.train_gradcon(gc.make_model("cae_grad", 1).double(), train, val,
                                          _config(seed, save_every=STOP), path)[:2]
        _assert_equal_runs([ref], [snaps], [history])


def test_a_notebook_state_continues_here_beside_a_fresh_model(tmp_path, monkeypatch):
    """Model 0 was interrupted in the notebook; model 1 starts afresh in the same call."""
    torch.set_num_threads(1)
    models, noise_states, reference = _models_and_reference("cae_grad")
    (train, val), seed = _data()[0], SEEDS[0]
    save = gc.save_checkpoint

    def save_then_stop(obj, path):
        save(obj, path)
        raise Interrupted

    path = tmp_path / "notebook.state.pt"
    torch.manual_seed(seed)
    with monkeypatch.context() as patched, pytest.raises(Interrupted):
        patched.setattr(gc, "save_checkpoint", save_then_stop)
        gc.train_gradcon(gc.make_model("cae_grad", 1).double(), train, val,
                         _config(seed, save_every=STOP), path)
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == STOP
    snaps, histories = _together(models, noise_states, "cae_grad", grouped=True,
                                 states=[state, None])
    _assert_equal_runs(reference, snaps, histories)


def test_the_script_resumes_from_its_state_file_and_removes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path))
    script = together
    args = ["--dataset", "digits", "--classes", "3", "--seeds", "0", "--epochs", "3",
            "--max-train", "60", "--max-test", "40", "--device", "cpu", "--save-every", "2"]
    save = script.save_checkpoint

    def save_then_stop(obj, path):
        save(obj, path)
        if str(path).endswith(".state.pt"):
            raise Interrupted

    monkeypatch.setattr(script, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        script.main(args)
    (state_path,) = (tmp_path / "gradcon").glob("*.state.pt")
    assert torch.load(state_path, weights_only=True)["epoch"] == 2
    monkeypatch.setattr(script, "save_checkpoint", save)
    assert script.main(args) == 0
    assert not state_path.exists()
    ckpt = torch.load(state_path.with_suffix("").with_suffix(".pt"), weights_only=True)
    assert ckpt["trainer"]["resumed_after_epoch"] == 2
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2, 3]


def test_the_command_line_runs_as_a_module():
    """``python -m nbutils.methods.gradcon_together`` is the documented command."""
    out = subprocess.run([sys.executable, "-m", "nbutils.methods.gradcon_together", "--help"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "--init" in out and "--save-every" in out and "--variant" in out


def test_the_checkpoint_key_is_the_chapters():
    """The trainer names its checkpoints with the chapter's own function: the notebook, which
    keys an official run by the same parameters, finds them."""
    p = gc.checkpoint_params(dataset="mnist", normal_class=4, protocol="gradcon50", seed=0,
                             variant="cae_grad", epochs=1000, batch_size=64, lr=1e-3,
                             alpha=0.03, max_train=0, max_test=0, n_train=5258)
    assert together.checkpoint_path is gc.checkpoint_path
    # the names in the published records (book/runs/paper/gradcon/mnist-faithful and
    # mnist-mean-output, class 4 seed 0): the key must not change
    assert gc.checkpoint_path(p).name == "mnist_class4_cae_grad_seed0_3a16de2b1d.pt"
    mean = gc.checkpoint_params(**{**p, "init": "mean_output"})
    assert gc.checkpoint_path(mean).name == "mnist_class4_cae_grad_seed0_6b0e842284.pt"
    assert "init_attempt" in gc.checkpoint_params(**{**p, "attempt": 1})
