"""The stall study (``nbutils.methods.gradcon_stalls``, exported from
``notebooks/gradcon_stalls.ipynb``): deciding early gives the stall rule's verdict, the probe
only watches, its counts are right, starts are computed once, and the results page computes
its sentences from records."""

import math
from dataclasses import replace

import nbformat
import pytest
import torch
from pages import output_text

from nbutils import book
from nbutils.config import PROJECT_ROOT, seed_everything
from nbutils.data import load_one_class
from nbutils.methods import gradcon as gc
from nbutils.methods import gradcon_stalls as st
from nbutils.records import make_record, write_record

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    split = load_one_class("digits", 3, protocol="gradcon50", seed=0, image_size=28, channels=1,
                           max_train=48)
    return torch.from_numpy(split.train), torch.from_numpy(split.val)


def test_wilson_interval_matches_known_values():
    lo, hi = st.wilson_interval(0, 10)
    assert lo == 0 and abs(hi - 0.2775) < 1e-4
    lo, hi = st.wilson_interval(5, 10)
    assert abs(lo - 0.2366) < 1e-4 and abs(hi - 0.7634) < 1e-4
    assert st.wilson_interval(10, 10)[1] == 1 and math.isnan(st.wilson_interval(0, 0)[0])


@pytest.mark.parametrize("variant", ["cae", "cae_grad"])
def test_deciding_early_gives_the_full_rule_verdict(digits, variant):
    """run_start stops at the first crossing (or at stall_epoch) with the same curve as the
    chapter's full training of the same seed, and the same verdict of ``stalled``."""
    x_train, x_val = digits
    config = gc.TrainConfig(epochs=6, batch_size=16, stall_epoch=6, stall_ratio=0.99)
    for init in ("official", "mean_output"):
        r = st.run_start(x_train, x_val, variant=variant, init=init, start=1, config=config,
                         probe_iterations=4)
        seed_everything(1)
        model = gc.make_model(variant, 1)
        if init == "mean_output":
            gc.set_output_bias_to_mean(model, x_train)
        _, full, _ = gc.train_gradcon(model, x_train, x_val, replace(config, seed=1, variant=variant))
        full_v = [h["val_recon"] for h in full]
        assert r["val_recon"] == full_v[:r["epochs"]]
        assert r["stalled"] == gc.stalled(full, 6, 0.99)
        cross = gc.crossing_epoch(full, 0.99)
        assert r["crossing_epoch"] == cross
        assert r["epochs"] == (cross if cross is not None else 6)
        assert [p["iteration"] for p in r["probe"]] == [1, 2, 3]  # the PROBE_AT rows among 4
        if variant == "cae":
            assert all(p["grad_loss"] == 0 for p in r["probe"])


def test_the_probe_only_watches(digits):
    x_train, x_val = digits
    config = gc.TrainConfig(seed=0, epochs=2, batch_size=16, variant="cae_grad")
    states, curves = [], []
    for probe in (None, gc.Probe(st.activation_stats, 5)):
        seed_everything(0)
        m = gc.make_model("cae_grad", 1)
        _, h, _ = gc.train_gradcon(m, x_train, x_val, config, probe=probe)
        states.append(m.state_dict())
        curves.append(h)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert curves[0] == curves[1]
    assert len(probe.rows) == 5 and probe.rows[0]["grad_loss"] == 0 < probe.rows[1]["grad_loss"]


def test_activation_stats_counts_dead_units_and_saturated_logits(digits):
    x = digits[0][:32]
    torch.manual_seed(0)
    m = gc.make_model("cae", 1)
    with torch.no_grad():
        base = st.activation_stats(m, x)
        m.down[0].bias[:16] = -1e4  # half the first layer's channels output 0 for every image
        dead = st.activation_stats(m, x)
        units = 32 * 15 * 15 + 32 * 8 * 8 + 64 * 5 * 5 + 64 * 3 * 3 + 64 * 4 * 4 + 32 * 8 * 8 + 32 * 14 * 14
        assert dead["dead_relu"] >= 16 * 15 * 15 / units
        m.up[-2].bias.fill_(-50.0)  # every output logit far below zero
        sat = st.activation_stats(m, x)
    assert base["saturated"] < 0.5 and sat["saturated"] == 1.0 and sat["max_logit"] < -10


def test_a_start_is_computed_once(tmp_path):
    calls = []
    path = st.start_path({"dataset": "digits", "normal_class": 3, "x": 1}, variant="cae",
                         init="official", start=4)
    path = tmp_path / path.name
    for _ in range(2):
        assert st.cached_start(path, lambda: calls.append(1) or {"stalled": True}) == {"stalled": True}
    assert calls == [1] and not list(tmp_path.glob("*.tmp*"))
    other = st.start_path({"dataset": "digits", "normal_class": 3, "x": 2}, variant="cae",
                          init="official", start=4)
    assert other.name != path.name  # another setting is another start


def _start(start, variant, init, stalled, ratio, dead):
    probe = [{"iteration": it, "recon": 1.0, "grad_loss": ratio if variant == "cae_grad" else 0.0,
              "dead_relu": dead, "saturated": 0.5, "mean_logit": -5.0, "max_logit": -1.0}
             for it in (1, 10, 100)]
    return {"start": start, "variant": variant, "init": init, "stalled": stalled,
            "crossing_epoch": None if stalled else 3, "epochs": 20 if stalled else 3, "seconds": 1.0,
            "val_recon": [0.1] * (20 if stalled else 3), "probe": probe}


def _page_text(tmp_path, runs):
    """The stall-study results page executed on ``runs``: its outputs as text."""
    out = book.execute_results(tmp_path / "page", runs, PROJECT_ROOT / "notebooks",
                               "gradcon_stalls_results")
    return output_text(out)


def test_results_page_computes_its_sentences(tmp_path):
    runs = tmp_path / "page" / "book" / "runs"
    for cls in (0, 1):
        rows = []
        for k in range(4):
            cae_stalls = k < (3 if cls == 0 else 1)   # 4 of 8 plain-CAE starts stall
            grad_stalls = k == 0                      # 2 of 8 CAE+Grad starts stall
            rows += [_start(k, "cae", "official", cae_stalls, 0.0, 0.9 if cae_stalls else 0.1),
                     _start(k, "cae_grad", "official", grad_stalls, 50.0 if grad_stalls else 0.5, 0.2),
                     _start(k, "cae", "mean_output", False, 0.0, 0.1),
                     _start(k, "cae_grad", "mean_output", False, 0.5, 0.1)]
        record = make_record(method="gradcon_stalls", variant="2x2", dataset="mnist", normal_class=cls,
                             protocol="gradcon50", seed=0, profile="paper",
                             params={"stall_epoch": 20, "starts": 4}, metrics={}, timings={},
                             device="cpu: test", data={}, extra={"starts": rows})
        folder = runs / "paper" / "gradcon_stalls" / "mnist"
        write_record(record, folder / f"class{cls}_seed0.json")
        nbformat.write(nbformat.v4.new_notebook(), folder / f"class{cls}_seed0.ipynb")
    text = _page_text(tmp_path, runs)
    assert ("CAE+Grad, official start: 2 of 8 starts stall (25%, 95% CI 7% to 59%); the same share "
            "in each of the 2 classes.") in text
    assert "Training time recorded: 0.5 minutes in all, summed over the 32 trainings' own clocks." in text
    assert ("plain CAE, official start: 4 of 8 starts stall (50%, 95% CI 22% to 78%); per class "
            "from 25% (class 1) to 75% (class 0).") in text
    assert "CAE+Grad, mean-output start: 0 of 8 starts stall (0%, 95% CI 0% to 32%)" in text
    assert ("Same weights, official start: of 8 starts, 2 stall only as a plain CAE and 0 only as "
            "CAE+Grad (2 stall as both).") in text
    assert ("No start that trains as a plain CAE stalls as CAE+Grad: in these starts the gradient "
            "loss causes no stall, and it rescues 2 of the 4 that stall as a plain CAE.") in text
    assert "best separates stalled from trained starts is *|grad alpha L_grad| / |grad recon|*" in text
    assert "is 50 times the reconstruction gradient (median) in stalled starts and 0.5 times" in text
    assert ("*dead ReLU units (share)* at iteration 1 (AUROC 1.00: higher in stalled starts; median "
            "0.9 in stalled starts") in text
    assert ("The earliest probed iteration at which some quantity tells them apart almost perfectly "
            "(AUROC at most 0.05 or at least 0.95) is 1: *|grad alpha L_grad| / |grad recon|*, "
            "*|grad alpha L_grad|*.") in text
    assert "Starts that trained crossed the stall line by epoch 3 at the latest" in text
    assert "different numbers of starts" not in text

    # a second block of starts for class 0 only (a block still under way in class 1)
    rows = [_start(k, v, i, False, 0.5, 0.1) for k in (4, 5)
            for v, i in (("cae", "official"), ("cae_grad", "official"))]
    record.update(normal_class=0, seed=4, extra={"starts": rows})
    write_record(record, folder / "class0_seed4.json")
    nbformat.write(nbformat.v4.new_notebook(), folder / "class0_seed4.ipynb")
    text = _page_text(tmp_path, runs)
    assert "The classes have different numbers of starts (class 0: 6, class 1: 4)" in text
    assert "CAE+Grad, official start: 2 of 10 starts stall" in text
