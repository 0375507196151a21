"""EfficientAD (notebooks/efficientad.ipynb): the chapter's checks, run on its exported code."""

import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

from nbutils.methods import efficientad as ead
from nbutils.methods.efficientad import (
    TORCH_QUANTILE_LIMIT,
    EfficientAD,
    FastEfficientAD,
    PretrainImages,
    anomaly_maps,
    autoencoder,
    distill_teacher,
    hard_feature_loss,
    load_teacher_file,
    map_quantiles,
    normalize_map,
    patchcore_embedding,
    pdn,
    pdn_output_size,
    quantile,
    raw_maps,
    receptive_field,
    teacher_normalization,
    train_efficientad,
)


def _meta_shape(net: nn.Module, size: int) -> tuple[int, ...]:
    return tuple(net.to("meta")(torch.zeros(1, 3, size, size, device="meta")).shape)


@pytest.mark.parametrize("size", ["small", "medium"])
def test_pdn_shapes_and_receptive_field(size):
    assert _meta_shape(pdn(size), 256) == (1, 384, 56, 56)
    assert _meta_shape(pdn(size, padding=True), 256) == (1, 384, 64, 64)
    assert _meta_shape(pdn(size, 768), 256) == (1, 768, 56, 56)  # the student
    assert pdn_output_size(256, size) == 56 and pdn_output_size(256, size, True) == 64
    assert [pdn_output_size(s, size) for s in (64, 128, 512)] == [8, 24, 120]
    assert receptive_field(pdn(size)) == (33, 33)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_autoencoder_matches_the_teacher_output(size):
    ae = autoencoder(size)
    n = pdn_output_size(size)
    assert _meta_shape(ae[:11], size) == (1, 64, 1, 1)
    assert _meta_shape(autoencoder(size), size) == (1, 384, n, n)


def test_teacher_file_public_format(tmp_path):
    torch.manual_seed(0)
    net = pdn("small")
    path = tmp_path / "teacher_small.pth"
    torch.save(net.state_dict(), path)
    loaded = load_teacher_file("small", path)
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(loaded(x), net(x))
    assert set(net.state_dict()) >= {"0.weight", "0.bias", "3.weight", "8.weight"}
    torch.save(net, tmp_path / "module.pth")  # a whole pickled module is accepted too
    assert torch.equal(load_teacher_file("small", tmp_path / "module.pth")(x), net(x))
    with pytest.raises(ValueError, match="not a PDN-medium"):
        load_teacher_file("medium", path)
    with pytest.raises(FileNotFoundError, match=r"teacher_medium\.pth"):
        load_teacher_file("medium", tmp_path / "absent.pth")


def test_missing_default_teacher_names_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_teacher_file("small")
    assert str(tmp_path / "efficientad" / "teachers" / "teacher_small.pth") in str(err.value)


def test_wide_resnet_offline_error(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models, "wide_resnet101_2", offline)
    with pytest.raises(RuntimeError, match="wide_resnet101_2.*efficientnet_lite0"):
        ead.WideResNetFeatures()


def test_quantile_beyond_torch_limit_equals_numpy():
    x = torch.rand(TORCH_QUANTILE_LIMIT + 1001, generator=torch.Generator().manual_seed(1))
    for q in (0.9, 0.999):
        assert float(quantile(x, q)) == pytest.approx(float(np.quantile(x.numpy(), q)), abs=1e-6)
    small = torch.randn(1001, dtype=torch.float64)
    for q in (0.0, 0.5, 0.9, 0.995, 1.0):
        assert float(quantile(small, q)) == pytest.approx(float(np.quantile(small.numpy(), q)),
                                                          abs=1e-12)


def test_quantile_large_path_matches_small_path(monkeypatch):
    x = torch.randn(3, 777, dtype=torch.float64)
    expected = [float(quantile(x, q)) for q in (0.0, 0.3, 0.9, 0.999, 1.0)]
    monkeypatch.setattr(ead, "TORCH_QUANTILE_LIMIT", 10)  # force the kthvalue path
    assert [float(quantile(x, q)) for q in (0.0, 0.3, 0.9, 0.999, 1.0)] == pytest.approx(expected)


def test_hard_feature_loss_keeps_the_top_tenth_of_a_percent():
    torch.manual_seed(0)
    t, s = torch.randn(2, 384, 16, 16), torch.randn(2, 384, 16, 16, requires_grad=True)
    d = (t - s.detach()) ** 2
    k = int((d >= quantile(d, 0.999)).sum())
    assert abs(k - 0.001 * d.numel()) <= 1
    loss = hard_feature_loss(t, s)
    assert torch.isclose(loss, torch.sort(d.ravel()).values[-k:].mean())
    loss.backward()
    assert int((s.grad != 0).sum()) == k  # only the hard differences train the student


def test_map_normalisation_sends_validation_quantiles_to_0_and_0_1():
    g = torch.Generator().manual_seed(0)
    st, ae = torch.rand(5, 8, 8, generator=g) * 3, torch.rand(5, 8, 8, generator=g) * 0.01
    q = map_quantiles(st, ae)
    for m, a, b in ((st, q["q_st_start"], q["q_st_end"]), (ae, q["q_ae_start"], q["q_ae_end"])):
        n = normalize_map(m, a, b)
        assert float(quantile(n, 0.9)) == pytest.approx(0.0, abs=1e-6)
        assert float(quantile(n, 0.995)) == pytest.approx(0.1, abs=1e-6)
    maps = anomaly_maps(st, ae, q, 64)
    assert maps["combined"].shape == (5, 64, 64)
    assert torch.equal(maps["score"], maps["combined"].amax((1, 2)))
    # the border the unpadded PDN does not see is 0 (the validation maps' 0.9 quantile)
    assert float(maps["combined"][:, :8, :8].abs().max()) < 1e-6


def test_patchcore_embedding_shape_and_constants():
    f2, f3 = torch.full((2, 40, 8, 8), 2.0), torch.full((2, 100, 4, 4), 2.0)
    emb = patchcore_embedding([f2, f3])
    assert emb.shape == (2, 384, 8, 8)
    # away from the zero padding of the 3x3 neighbourhoods (wider for the upsampled layer)
    assert torch.allclose(emb[:, :, 3:5, 3:5], torch.tensor(2.0))


def test_teacher_normalization_standardises_each_channel():
    torch.manual_seed(0)
    net = pdn("small")
    x = torch.rand(4, 3, 64, 64)
    mean, std = teacher_normalization(net, x, batch_size=3)
    out = (net(ead.imagenet_normalize(x)) - mean) / std
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(384), atol=1e-4)
    assert torch.allclose(out.std((0, 2, 3), unbiased=False), torch.ones(384), atol=1e-3)


def test_photos_exclude_the_synthetic_textures_and_crop(tmp_path):
    images = PretrainImages("")
    names = {p.name for p in images.paths}
    assert len(names) == 19 and not names & {"brick.png", "grass.png", "gravel.png"}
    x = images.sample(3, 40, torch.Generator().manual_seed(0), grayscale_p=1.0)
    assert x.shape == (3, 3, 40, 40) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(x[:, 0], x[:, 1])  # made grey
    from PIL import Image

    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(tmp_path / "a.png")
    folder = PretrainImages(tmp_path)
    assert folder.sample(2, 32, torch.Generator(), mode="center").shape == (2, 3, 32, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        PretrainImages(tmp_path / "empty")


class _TinyExtractor(nn.Module):
    """A frozen stand-in with features at strides 8 and 16."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 8, 8), nn.Conv2d(6, 10, 2, 2)

    @torch.no_grad()
    def forward(self, x):
        a = self.a(x)
        return [a, self.b(a)]


def test_distillation_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    ext = _TinyExtractor()
    images = PretrainImages("")
    kw = dict(batch_size=2, image_size=48, norm_images=4, seed=0, save_every=1)
    full, s_full = distill_teacher("small", ext, images, steps=3, ckpt_path=tmp_path / "a.pt", **kw)
    distill_teacher("small", ext, images, steps=2, ckpt_path=tmp_path / "b.pt", **kw)
    state = torch.load(tmp_path / "b.pt", weights_only=False)
    assert state["step"] == 2
    resumed, s_res = distill_teacher("small", ext, images, steps=3, ckpt_path=tmp_path / "b.pt", **kw)
    assert s_res["history"] == pytest.approx(s_full["history"])
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert _meta_shape(full, 256) == (1, 384, 56, 56)  # distilled with padding, used without


def test_lite0_features_are_stride_8_and_16():
    ext = ead.Lite0Features()
    a, b = ext(torch.zeros(1, 3, 64, 64))
    assert a.shape == (1, 240, 8, 8) and b.shape == (1, 672, 4, 4)
    assert ead.distillation_targets(ext, torch.rand(1, 3, 64, 64)).shape == (1, 384, 8, 8)


def test_training_resumes_and_scores(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 64, 64)
    kw = dict(batch_size=1, lr=1e-4, weight_decay=1e-5, hard_q=0.999, penalty_images=None,
              seed=0, save_every=1, eval_every=2)

    def fresh():
        torch.manual_seed(1)
        m = EfficientAD(pdn("small"), "small", 64)
        mean, std = teacher_normalization(m.teacher, x)
        m.teacher_mean.copy_(mean)
        m.teacher_std.copy_(std)
        return m

    a = fresh()
    sa = train_efficientad(a, x[:4], x[4:], steps=3, ckpt_path=tmp_path / "a.pt", **kw)
    b = fresh()
    train_efficientad(b, x[:4], x[4:], steps=3, ckpt_path=tmp_path / "b.pt", max_seconds=1e-9, **kw)
    assert torch.load(tmp_path / "b.pt", weights_only=False)["step"] == 1
    b = fresh()
    sb = train_efficientad(b, x[:4], x[4:], steps=3, ckpt_path=tmp_path / "b.pt", **kw)
    assert sb["step"] == 3 and [r["step"] for r in sb["curve"]] == [2, 3]
    for p, r in zip(a.student.state_dict().values(), b.student.state_dict().values()):
        assert torch.allclose(p, r, atol=1e-6)
    assert sa["curve"][-1]["val_st"] == pytest.approx(sb["curve"][-1]["val_st"], rel=1e-5)
    st, ae = raw_maps(a, x)
    assert st.shape == ae.shape == (6, 8, 8) and bool((st >= 0).all())


@pytest.mark.parametrize("size", ["small", "medium"])
def test_fast_inference_gives_the_reference_maps_and_scores(size):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 64)
    model = EfficientAD(pdn(size), size, 64).eval()
    mean, std = teacher_normalization(model.teacher, x)
    model.teacher_mean.copy_(mean)
    model.teacher_std.copy_(std)
    q = map_quantiles(*raw_maps(model, x))
    with pytest.raises(ValueError, match="quantiles"):
        FastEfficientAD(model)
    for name, value in q.items():
        getattr(model, name).fill_(value)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = FastEfficientAD(model)
    with torch.inference_mode():
        ref = anomaly_maps(*raw_maps(model, x), q, 64)
        m, score = fast(x)
    assert m.shape == (3, 64, 64) and score.shape == (3,)
    assert torch.allclose(m, ref["combined"], atol=1e-5) and torch.allclose(score, ref["score"], atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # not changed


@pytest.mark.slow
def test_latency_benchmark_checks_every_variant_and_writes_its_table(tmp_path):
    """The benchmark script at its smallest: every variant's map must match the reference
    path's before it is timed, and the JSON holds the rows the results page reads."""
    import importlib.util
    import json

    from nbutils.config import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location(
        "efficientad_latency", PROJECT_ROOT / "benchmarks" / "efficientad_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "lat.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main([str(out), "--sizes", "small", "--batches", "1", "--repeats", "2",
                           "--warmup", "0", "--threads", "1"]) == 0
    finally:  # the script sets the process's thread count: give the other tests theirs back
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    variants = {r["variant"] for r in result["rows"]}
    assert {"reference", "fast"} <= variants
    assert all(r["median_ms"] > 0 and r["n"] == 2 for r in result["rows"])
    assert set(result["parts_ms"]["small"]) >= {"teacher", "student", "autoencoder"}
    assert max(result["max_map_difference"].values()) < 1e-3
