"""GradCon speed: official one-image-at-a-time scoring vs vectorised scoring, and training.

    python benchmarks/gradcon_speed.py book/runs/bench/gradcon_speed_cpu.json --threads 1

Scoring. The official ``gradcon_score`` runs a forward and a backward pass per test image
(batch size 1) and reads ``.grad`` of the four decoder convolutions (the GradCon chapter's
``official_loop_scores``). Two vectorised versions compute the same numbers for a batch at
once: ``torch.func`` (``vmap`` of ``grad``; the Fisher-kernel chapter's
``decoder_gradient_batches``) and an explicit batched version (one batched backward to every
decoder layer's output, then each image's weight gradient as its layer input times its
unfolded output gradient, one batched matmul per layer; the GradCon chapter's
``gradcon_terms``). All three must give identical scores (asserted).

Training. The official loop (a ``DataLoader`` over per-image tensors, four separate
``autograd.grad`` calls, an ``AverageMeter`` reference; kept here, as the official code has
it) against the chapter's ``train_step`` (batches sliced from one in-memory tensor, one
``autograd.grad`` call for the four weights). Both run the same number of iterations from the
same initial weights and must reach the same losses.

The model, the scorers and the training step are imported from ``nbutils.methods`` (exported
from the chapter notebooks); only the official code's own loops live here.

The same model (GradCon's CAE, after a few training iterations) and the same images (MNIST
test images of one class and others if ``DATA_DIR`` has MNIST, else the embedded digits) are
used for every method. The JSON written has the settings, the timings and the speed-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nbutils.gradients import cosine_to_reference
from nbutils.methods import gradcon as gc
from nbutils.methods.fisher_kernel import decoder_gradient_batches

# ----------------------------------------------------------------------------------------
# Scoring: (reconstruction MSE, -mean over layers of cos(per-image gradient, reference))


def score_torch_func(model, x, ref, batch_size=128):
    """The scores from ``torch.func`` gradients (``vmap`` of ``grad``), batch by batch."""
    rec, gterm = [], []
    for losses, grads in decoder_gradient_batches(model, x, batch_size):
        cos = torch.stack([cosine_to_reference(g, r) for g, r in zip(grads, ref, strict=True)])
        rec.append(losses.double().cpu().numpy())
        gterm.append((-cos.mean(0)).double().cpu().numpy())
    return np.concatenate(rec), np.concatenate(gterm)


# ----------------------------------------------------------------------------------------
# Training iterations


class AverageMeter:
    """The official running average (sum / count, a new tensor at every update)."""

    def __init__(self, like):
        self.avg, self.sum, self.count = torch.zeros_like(like), 0, 0

    def update(self, val, n=1):
        self.sum = self.sum + val * n
        self.count += n
        self.avg = self.sum / self.count


def train_official(model, loader, iters, alpha=0.03, lr=1e-3, device="cpu"):
    """The official train(): four autograd.grad calls, AverageMeter references."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ref = [AverageMeter(w) for w in gc.decoder_weights(model)]
    losses, it = [], 0
    while it < iters:
        for data, target in loader:
            data, target = data.to(device), target.to(device)  # the official .cuda()
            opt.zero_grad()
            model.zero_grad()
            rec = F.mse_loss(model(data), target)
            grad_loss = 0
            for i in range(4):
                g = torch.autograd.grad(rec, model.up[2 * i].weight, create_graph=True,
                                        retain_graph=True)[0]
                grad_loss += -F.cosine_similarity(g.view(-1, 1), ref[i].avg.view(-1, 1), dim=0)
            grad_loss = torch.zeros(1, device=device) if ref[0].count == 0 else grad_loss / 4
            loss = rec + alpha * grad_loss
            loss.backward()
            for i in range(4):
                ref[i].update(model.up[2 * i].weight.grad, 1)
            opt.step()
            losses.append(loss.item())
            it += 1
            if it == iters:
                break
    return losses


def _git_commit() -> str:
    """The commit, '-dirty' if nbutils or this script differ from it (nbutils.records)."""
    from nbutils.records import git_commit

    os.environ["NBUTILS_SOURCE_NOTEBOOK"] = str(Path(__file__).resolve())
    return git_commit()


def train_chapter(model, x, iters, batch_size=64, alpha=0.03, lr=1e-3):
    """``iters`` iterations of the chapter's ``train_step`` on the batches of ``x`` in order
    (no shuffling, as the official loader here): in-memory batches, one autograd.grad call."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    weights = gc.decoder_weights(model)
    ref = gc.RunningMean(weights)
    losses = []
    while len(losses) < iters:
        for s in range(0, len(x), batch_size):
            loss, _, _ = gc.train_step(model, opt, ref, weights, x[s:s + batch_size], alpha)
            losses.append(loss.item())
            if len(losses) == iters:
                break
    return losses


class _PerImage(torch.utils.data.Dataset):
    """Per-item conversion from uint8, as the official AnomalyDataset + ToTensor."""

    def __init__(self, images_uint8):
        self.images = images_uint8

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        t = torch.from_numpy(self.images[i].astype(np.float32) / 255.0)
        return t, t.clone()


# ----------------------------------------------------------------------------------------


def load_images(n_images: int, seed: int):
    """Test images of MNIST (normal class 4 + others) if available, else embedded digits."""
    from nbutils.data import DataMissingError, load_one_class

    try:
        split = load_one_class("mnist", 4, protocol="gradcon50", seed=seed)
    except DataMissingError:
        split = load_one_class("digits", 4, protocol="gradcon50", seed=seed, image_size=28)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(split.test), size=min(n_images, len(split.test)), replace=False)
    return split, torch.from_numpy(split.test[np.sort(idx)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, repeats, device):
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times), times, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--n-images", type=int, default=1024, help="images scored")
    parser.add_argument("--batch-size", type=int, default=256, help="vectorised batch size")
    parser.add_argument("--train-iters", type=int, default=60, help="training iterations timed")
    parser.add_argument("--repeats", type=int, default=3, help="timings repeated, best kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    args = parser.parse_args(argv)

    from nbutils.config import describe_device, get_device

    dev = get_device(args.device)
    # full float32 in cuDNN too: TF32 convolutions would differ from the batched matmuls by
    # about 1e-3 and fail the identical-scores assertion
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    split, x = load_images(args.n_images, args.seed)
    x = x.to(dev)
    model = gc.make_model("cae_grad", x.shape[1], dev)
    n_params = sum(p.numel() for p in model.parameters())

    # Training: both loops from the same initial weights, on the same batches (no shuffling).
    init = {k: v.clone() for k, v in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(
        _PerImage((split.train * 255).round().astype(np.uint8)), batch_size=64, shuffle=False)
    x_u8 = torch.from_numpy((split.train * 255).round().astype(np.uint8).astype(np.float32) / 255).to(dev)
    timings = {}
    loops = (("official", lambda n: train_official(model, loader, n, device=dev)),
             ("vectorised", lambda n: train_chapter(model, x_u8, n)))
    for _, fn in loops:  # warm-up, so that neither loop pays for start-up
        model.load_state_dict(init)
        fn(3)
    for name, fn in ((name, lambda fn=fn: fn(args.train_iters)) for name, fn in loops):
        model.load_state_dict(init)
        _sync(dev)
        start = time.perf_counter()
        losses = fn()
        _sync(dev)
        timings[name] = (time.perf_counter() - start, losses)
    l_off, l_vec = np.array(timings["official"][1]), np.array(timings["vectorised"][1])
    # Same maths, different summation order: float differences grow through Adam over many
    # iterations, so the first ten must agree tightly and the rest only closely.
    assert np.allclose(l_off[:10], l_vec[:10], rtol=1e-4, atol=1e-6), (l_off[:10], l_vec[:10])
    assert np.allclose(l_off, l_vec, rtol=0.05), np.abs(l_off - l_vec).max()
    train = {k: {"seconds": v[0], "iters_per_s": args.train_iters / v[0]}
             for k, v in timings.items()}
    train["speedup"] = train["vectorised"]["iters_per_s"] / train["official"]["iters_per_s"]
    train["max_abs_loss_difference"] = float(np.abs(l_off - l_vec).max())

    # Scoring: the model after those iterations; reference = its mean training gradient.
    model.eval()
    _, grads = gc.per_sample_decoder_grads(model, torch.from_numpy(split.train[:512]).to(dev))
    ref = [g.mean(0) for g in grads]
    methods = {"official_loop": lambda: gc.official_loop_scores(model, x, ref),
               "torch_func_vmap": lambda: score_torch_func(model, x, ref),
               "batched_unfold": lambda: gc.gradcon_terms(model, x, ref, args.batch_size)}
    for fn in (gc.official_loop_scores, score_torch_func, gc.gradcon_terms):
        fn(model, x[:16], ref)  # warm-up: kernels loaded, cuDNN plans chosen
    scoring, outs = {}, {}
    for name, fn in methods.items():
        best, times, out = best_of(fn, args.repeats, dev)
        scoring[name] = {"seconds": best, "images_per_s": len(x) / best, "all_seconds": times}
        outs[name] = out
    for name in ("torch_func_vmap", "batched_unfold"):
        rec_d = float(np.abs(outs[name][0] - outs["official_loop"][0]).max())
        g_d = float(np.abs(outs[name][1] - outs["official_loop"][1]).max())
        assert rec_d < 1e-6 and g_d < 1e-5, (name, rec_d, g_d)
        scoring[name]["max_abs_diff_recon"] = rec_d
        scoring[name]["max_abs_diff_grad_term"] = g_d
        scoring[name]["speedup_vs_official"] = (scoring[name]["images_per_s"]
                                                / scoring["official_loop"]["images_per_s"])

    result = {"benchmark": "gradcon_speed", "device": describe_device(dev), "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "python": platform.python_version(),
              "data": split.source, "n_images": len(x), "n_params": n_params,
              "batch_size": args.batch_size, "train_iters": args.train_iters,
              "repeats": args.repeats, "scoring": scoring, "training": train,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
              "git_commit": _git_commit()}
    try:
        with open("/proc/cpuinfo") as f:
            result["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))

    print(f"GradCon speed on {result['device']} ({result['cpu']}, {args.threads} thread(s)); {len(x)} images, "
          f"{n_params:,}-parameter CAE")
    print(f"{'scoring':<18}{'images/s':>12}{'speed-up':>10}{'max |diff|':>12}")
    for name, s in scoring.items():
        diff = max(s.get("max_abs_diff_recon", 0.0), s.get("max_abs_diff_grad_term", 0.0))
        print(f"{name:<18}{s['images_per_s']:>12.1f}{s.get('speedup_vs_official', 1.0):>10.2f}"
              f"{diff:>12.1e}")
    print(f"{'training':<18}{'iters/s':>12}{'speed-up':>10}")
    for name in ("official", "vectorised"):
        speed = train["speedup"] if name == "vectorised" else 1.0
        print(f"{name:<18}{train[name]['iters_per_s']:>12.2f}{speed:>10.2f}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
