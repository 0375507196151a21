"""Train many GradCon CAEs at once: every (class, seed) run of a sweep in one process.

    python benchmarks/gradcon_together.py --classes all --seeds 0 --epochs 1000 --device cuda

GradCon's CAE is small (231k parameters, batches of 64 MNIST images), so one training run
keeps a GPU almost idle: the time goes into launching kernels from Python, not into
arithmetic. Two ways to run many models at once are implemented:

* **grouped** (the CPU default): G models side by side as grouped convolutions
  (``groups=G``; model g sees its own batch in channel block g). Nothing couples the groups:
  the loss is the sum of the per-model losses, so each model's slice of every gradient is its
  own gradient. On the H200, cuDNN's grouped kernels were slow (GPU-bound, linear in G).
* **side by side** (the GPU default): each model gets its own CUDA stream; after one eager
  epoch, a training iteration and each validation batch are captured as CUDA graphs and
  replayed, and every model's epoch is queued before any is read back, so the streams run
  concurrently. Ten MNIST models for 1000 epochs took 7.5 minutes on one H200
  (``book/runs/bench/gradcon_together_h200_seed0.json``).

What each model sees is exactly the notebook's ``train_gradcon`` (``notebooks/gradcon.ipynb``):
same initial weights (the notebook's ``GradConCAE`` after ``seed_everything(seed)``), same
shuffling generator, batches of 64 with a short last batch, the gradient loss against the
cumulative mean of past total-loss gradients (from the second iteration on), Adam, the
official validation loss every epoch and the three snapshots (faithful, corrected, last).
Classes have different numbers of images, so a grouped model whose epoch has ended sits out
the remaining iterations of that epoch: its samples are masked and its Adam step is skipped.
``tests/test_gradcon_together.py`` checks both layouts against the notebook's own loop in
float64. (On a GPU, two runs of the same thing already differ: in one comparison here, by up
to 15% in a loss after six epochs. cuDNN's kernels are not deterministic and Adam amplifies it.)

Nothing is lost when a sweep is interrupted: every ``--save-every`` epochs (25) each model's
whole training state is saved beside its checkpoint in the notebook's ``.state.pt`` format,
and the next call continues from it. The formats being one, a run interrupted here can be
finished by the notebook (on a CPU, say), and a notebook run's saved state can be finished
here, beside models that start afresh. ``tests/test_gradcon_together.py`` checks all three
against the uninterrupted run in float64.

The checkpoints are written where, and as, the notebook writes them (same key), so the
pipeline's notebook runs then find them and only score:

    python -m nbutils.pipeline --profile paper --notebook gradcon --tag faithful corrected --seeds 0

All four variants train together. The VAEs' sampling noise is drawn, on the CPU, from one
generator per model that starts where the notebook's global generator stands after making
that model, so a VAE trained here equals the notebook's run when nothing else draws from the
global generator between the model and its training (the test's case). On a GPU the noise
comes from the default CUDA generator, which the captured graphs can replay.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import nbformat
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import trange

from nbutils.config import (
    checkpoint_dir,
    describe_device,
    get_device,
    save_checkpoint,
    seed_everything,
)
from nbutils.data import dataset_info, load_one_class
from nbutils.records import git_commit

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "gradcon.ipynb"
DECODER_CONVS = (0, 2, 4, 6)


VARIANTS = ("cae", "cae_grad", "vae", "vae_grad")


def notebook_model_cell(variant: str = "cae_grad", in_channels: int = 1) -> dict:
    """The namespace of the notebook's cell tagged ``model`` (the code the reader sees)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    namespace = {"variant": variant, "in_channels": in_channels, "dev": torch.device("cpu"),
                 "nn": nn, "torch": torch}
    for cell in nb.cells:
        if cell.cell_type == "code" and "model" in cell.metadata.get("tags", []):
            exec(compile(cell.source, str(NOTEBOOK), "exec"), namespace)
    return namespace


def notebook_model_class(variant: str = "cae_grad", in_channels: int = 1) -> type[nn.Module]:
    """The notebook's ``GradConCAE`` (or ``GradConVAE`` for the VAE variants)."""
    cell = notebook_model_cell(variant, in_channels)
    return cell["GradConVAE" if variant.startswith("vae") else "GradConCAE"]


def grouped(layers_of_each: list[nn.Sequential]) -> nn.Sequential:
    """One Sequential whose convolutions hold the G given Sequentials side by side (groups=G)."""
    g = len(layers_of_each)
    out = []
    for layers in zip(*layers_of_each, strict=True):
        first = layers[0]
        if isinstance(first, (nn.Conv2d, nn.ConvTranspose2d)):
            assert first.groups == 1 and first.dilation == (1, 1)
            kind = type(first)
            extra = {"output_padding": first.output_padding} if kind is nn.ConvTranspose2d else {}
            new = kind(g * first.in_channels, g * first.out_channels, first.kernel_size,
                       stride=first.stride, padding=first.padding, groups=g, **extra,
                       dtype=first.weight.dtype, device=first.weight.device)  # no rounding
            with torch.no_grad():  # both weight layouts put the groups along dim 0
                new.weight.copy_(torch.cat([m.weight for m in layers]))
                new.bias.copy_(torch.cat([m.bias for m in layers]))
            out.append(new)
        else:
            out.append(copy.deepcopy(first))
    return nn.Sequential(*out)


class GroupedCAE(nn.Module):
    """G GradCon CAEs in one module; input and output are (batch, G * channels, H, W)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.groups = len(models)
        self.down = grouped([m.down for m in models])
        self.up = grouped([m.up for m in models])

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def state_of(self, g: int, template: nn.Module) -> dict[str, Tensor]:
        """Model g's weights as a state dict of the single model ``template``."""
        shapes = {k: v.shape for k, v in template.state_dict().items()}
        return {k: p.detach().view(self.groups, -1)[g].reshape(shapes[k]).clone()
                for k, p in self.named_parameters()}


class GroupedLinear(nn.Module):
    """G linear layers side by side: (G, batch, in) -> (G, batch, out)."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]).clone())
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]).clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias[:, None, :], x, self.weight.transpose(1, 2))


class GroupedVAE(GroupedCAE):
    """G GradCon VAEs: the CAE's grouped convolutions, and the three fully connected layers
    per model around the 64x3x3 code. ``forward`` returns the reconstruction
    (batch, G * channels, H, W) and mu, logvar of shape (G, batch, 576)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__(models)
        self.fc11, self.fc12, self.fc2 = (GroupedLinear([getattr(m, name) for m in models])
                                          for name in ("fc11", "fc12", "fc2"))

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        batch = x.shape[0]
        h = self.down(x).view(batch, self.groups, -1).transpose(0, 1)
        mu, logvar = self.fc11(h), self.fc12(h)
        z = mu if noise is None else mu + noise * torch.exp(0.5 * logvar)  # training: sampled
        code = self.fc2(z).transpose(0, 1).reshape(batch, -1, 3, 3)
        return self.up(code), mu, logvar


class FlatMaskedAdam:
    """Adam (as ``torch.optim.Adam``, no weight decay) with one step count per group; groups
    whose ``active`` flag is off are left untouched. The state lives in (G, P) matrices so
    that a step is a handful of kernels, not a dozen per parameter tensor."""

    def __init__(self, params: list[Tensor], groups: int, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.groups, self.lr, self.eps = params, groups, lr, eps
        self.beta1, self.beta2 = betas
        self.sizes = [p.numel() // groups for p in params]
        dev, dtype = params[0].device, params[0].dtype
        self.m = torch.zeros(groups, sum(self.sizes), device=dev, dtype=dtype)
        self.v = torch.zeros_like(self.m)
        self.steps = torch.zeros(groups, 1, device=dev, dtype=dtype)

    @torch.no_grad()
    def step(self, active: Tensor) -> None:
        a = active.view(-1, 1)
        grad = torch.cat([p.grad.view(self.groups, -1) for p in self.params], dim=1)
        self.steps += a
        self.m.copy_(torch.where(a, self.m.lerp(grad, 1 - self.beta1), self.m))
        self.v.copy_(torch.where(a, self.v * self.beta2 + (1 - self.beta2) * grad * grad, self.v))
        t = self.steps.clamp_min(1)
        step_size = self.lr / (1 - self.beta1 ** t)
        denom = self.v.sqrt() / (1 - self.beta2 ** t).sqrt() + self.eps
        update = torch.where(a, step_size * self.m / denom, 0.0)
        for p, u in zip(self.params, update.split(self.sizes, dim=1), strict=True):
            p.view(self.groups, -1).sub_(u)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def _padded(xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(G, n_max, ...) zero-padded stack and the (G,) sizes."""
    n = torch.tensor([len(x) for x in xs])
    out = xs[0].new_zeros((len(xs), int(n.max()), *xs[0].shape[1:]))
    for g, x in enumerate(xs):
        out[g, :len(x)] = x
    return out, n.to(xs[0].device)


def _cos_rows(a: Tensor, b: Tensor) -> Tensor:  # row-wise, as F.cosine_similarity on (1, -1)
    return F.cosine_similarity(a, b, dim=1)


def _to_cpu(obj):
    """``obj`` with every tensor in it (nested dicts and lists) moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _train_epochs(models: list[nn.Module], trains: list[Tensor], vals: list[Tensor],
                  seeds: list[int], *, epochs: int, batch_size: int, lr: float, alpha: float,
                  use_grad_loss: bool, cuda_graphs: bool, stream: torch.cuda.Stream | None,
                  noise_states: list[Tensor] | None = None,
                  resume: list[dict] | None = None, save_every: int = 0,
                  on_state: Callable[[int, dict], None] | None = None):
    """A generator: trains the G models (grouped convolutions), one epoch per ``next``.

    Each ``next`` first finishes the previous epoch (reads its losses back, keeps snapshots)
    and then queues the next epoch's work without waiting for it, so that a driver can queue
    the epochs of several such generators, on several CUDA streams, before any of them waits.
    On a GPU the first epoch runs eagerly (it also warms cuDNN up), then one training
    iteration and each validation batch are captured as CUDA graphs and replayed: the same
    kernels without Python's launch overhead. Returns (snapshots, histories).

    ``resume``: one training state per model, in the format of the notebook's ``.state.pt``
    files, all after the same epoch; training continues from there. Every ``save_every``
    epochs (and not after the last), ``on_state(g, state)`` receives model g's state in that
    format, on the CPU, so that the notebook or this trainer can continue it.
    """
    G, dev, dtype = len(models), trains[0].device, trains[0].dtype
    use_graphs = cuda_graphs and dev.type == "cuda"
    vae = hasattr(models[0], "fc2")
    first_epoch = resume[0]["epoch"] if resume else 0
    if resume:
        assert all(s["epoch"] == first_epoch for s in resume), "one group resumes from one epoch"
        models = [copy.deepcopy(m) for m in models]
        for m, s in zip(models, resume, strict=True):
            m.load_state_dict(s["model"])
    net = (GroupedVAE if vae else GroupedCAE)(models).to(dev, dtype)
    template = models[0]
    weights = [net.up[i].weight for i in DECODER_CONVS]
    opt = FlatMaskedAdam(list(net.parameters()), G, lr)
    ref_sum = [torch.zeros(G, w.numel() // G, device=dev, dtype=dtype) for w in weights]
    ref_count = torch.zeros(G, device=dev, dtype=dtype)
    X, n_train = _padded(trains)
    V, n_val = _padded(vals)
    chw = X.shape[2:]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise_gens = []  # the VAEs' sampling on the CPU: one generator per model
    for g, s in enumerate(seeds if vae else []):
        noise_gens.append(torch.Generator())
        if noise_states is not None:
            noise_gens[-1].set_state(noise_states[g])
        else:
            noise_gens[-1].manual_seed(10_000 + s)
    iters = math.ceil(int(n_train.max()) / batch_size)
    v_iters = math.ceil(int(n_val.max()) / batch_size)
    rows = torch.arange(G, device=dev)[:, None]
    # static buffers: the captured graphs read and write these very tensors
    idx_buf = torch.full((G, batch_size), -1, dtype=torch.long, device=dev)
    sums = torch.zeros(G, 3, device=dev, dtype=dtype)
    vsums = torch.zeros_like(sums)
    epoch_grad = [torch.zeros_like(s) for s in ref_sum]
    v_pos = [torch.arange(j * batch_size, min((j + 1) * batch_size, V.shape[1]), device=dev)
             for j in range(v_iters)]
    # the notebook's names and order of parameters (its Adam state is keyed by position)
    names = [n for n, _ in net.named_parameters()]
    order_of = {n: i for i, (n, _) in enumerate(template.named_parameters())}
    shapes = {n: p.shape for n, p in template.named_parameters()}
    offsets = np.cumsum([0, *opt.sizes])

    def ref_avg() -> list[Tensor]:
        return [s / ref_count.clamp_min(1)[:, None] for s in ref_sum]

    def noise(count: Tensor, batch: int) -> Tensor:
        """The VAEs' standard normal draws for one training batch, (G, batch, 576)."""
        if dev.type == "cuda":  # the default generator: capturable in CUDA graphs
            return torch.randn(G, batch, 576, device=dev, dtype=dtype)
        eps = torch.zeros(G, batch, 576, dtype=dtype)
        for g, n in enumerate(count.tolist()):  # as the notebook: n draws, none once done
            if n:
                eps[g, :n] = torch.randn(n, 576, generator=noise_gens[g], dtype=dtype)
        return eps

    def recon(xb: Tensor, mask: Tensor, training: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Per-model batch reconstruction loss (MSE; the VAEs: BCE summed over pixels) and
        latent loss (the VAEs' KL), both (G,) over the unmasked images, and their number."""
        count = mask.sum(1)
        x_in = xb.transpose(0, 1).reshape(xb.shape[1], -1, *chw[1:])
        if vae:
            eps = noise(count, xb.shape[1]) if training else None
            out, mu, logvar = net(x_in, eps)
        else:
            out = net(x_in)
        out = out.view(xb.shape[1], G, *chw).transpose(0, 1)
        if vae:
            per_image = F.binary_cross_entropy(out, xb, reduction="none").flatten(2).sum(2)
            per_latent = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(2)
        else:
            per_image = (out - xb).pow(2).flatten(2).mean(2)
            per_latent = torch.zeros_like(per_image)
        n = count.clamp_min(1)
        return (per_image * mask).sum(1) / n, (per_latent * mask).sum(1) / n, count

    def grad_loss(rec: Tensor, create_graph: bool) -> Tensor:
        grads = torch.autograd.grad(rec.sum(), weights, create_graph=create_graph, retain_graph=True)
        avg = ref_avg()
        return -torch.stack([_cos_rows(g.view(G, -1), r) for g, r in zip(grads, avg, strict=True)]).mean(0)

    def train_step() -> None:  # no host synchronisation: capturable
        mask = idx_buf >= 0
        active = mask.any(1)
        xb = X[rows, idx_buf.clamp_min(0)]
        opt.zero_grad()
        rec, lat, count = recon(xb, mask, training=True)
        if use_grad_loss:
            gl = grad_loss(rec, create_graph=True) * (active & (ref_count > 0))
        else:
            gl = torch.zeros(G, device=dev, dtype=dtype)
        loss = rec + lat + alpha * gl
        loss.sum().backward()
        with torch.no_grad():
            for s, e, w in zip(ref_sum, epoch_grad, weights, strict=True):
                gw = w.grad.view(G, -1) * active[:, None]
                s += gw
                e += gw
            ref_count.add_(active)
            sums.add_(torch.stack([loss, rec + lat, gl], 1).detach() * count[:, None])
        opt.step(active)

    def val_step(j: int) -> None:
        mask = v_pos[j][None, :] < n_val[:, None]
        rec, lat, count = recon(V[:, v_pos[j]], mask, training=False)
        gl = grad_loss(rec, create_graph=False)
        vsums.add_(torch.stack([rec + lat + alpha * gl, rec + lat, gl], 1).detach() * count[:, None])

    train_graph, val_graphs = None, [None] * v_iters

    def run(step, graph):
        """Replay ``graph`` if captured; else capture (from the second epoch) or run eagerly."""
        if graph is None and use_graphs and epoch > first_epoch:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(dev)):
                step()
        if graph is not None:
            graph.replay()
        else:
            step()
        return graph

    snaps: list[dict] = [{} for _ in range(G)]
    histories: list[list[dict]] = [[] for _ in range(G)]
    best_val = np.full(G, np.inf)
    best_rec = np.full(G, np.inf)
    seconds_before = np.zeros(G)
    for g, s in enumerate(resume or []):
        adam = s["opt"]["state"]
        for n, a, b in zip(names, offsets[:-1], offsets[1:], strict=True):
            opt.m[g, a:b] = adam[order_of[n]]["exp_avg"].flatten()
            opt.v[g, a:b] = adam[order_of[n]]["exp_avg_sq"].flatten()
        opt.steps[g] = float(adam[order_of[names[0]]]["step"])
        for total, t in zip(ref_sum, s["ref_sum"], strict=True):
            total[g] = t.flatten()
        ref_count[g] = s["ref_count"]
        gens[g].set_state(s["gen"].cpu())  # loaded onto the device with the rest
        if vae:
            noise_gens[g].set_state(s["torch_rng"].cpu())
        best_val[g], best_rec[g] = s["best_val"], s["best_rec"]
        snaps[g], histories[g] = dict(s["snaps"]), list(s["history"])
        seconds_before[g] = s["seconds"]
    t_start = time.perf_counter()

    def snapshot(g: int, epoch: int) -> dict:
        return {"epoch": epoch, "state": net.state_of(g, template),
                "ref": [a[g].reshape(w.shape[0] // G, *w.shape[1:]).clone()
                        for a, w in zip(ref_avg(), weights, strict=True)]}

    def notebook_state(g: int, epoch: int) -> dict:
        """Model g's training state as the notebook's ``train_gradcon`` saves it."""
        model = copy.deepcopy(template)
        model.load_state_dict(net.state_of(g, template))
        adam = torch.optim.Adam(model.parameters(), lr=lr)
        params = dict(model.named_parameters())
        step = float(opt.steps[g])
        for n, a, b in zip(names, offsets[:-1], offsets[1:], strict=True):
            adam.state[params[n]] = {
                "step": torch.tensor(step, dtype=torch.float32),
                "exp_avg": opt.m[g, a:b].view(shapes[n]).clone(),
                "exp_avg_sq": opt.v[g, a:b].view(shapes[n]).clone()}
        rng = (noise_gens[g].get_state() if vae else
               noise_states[g] if noise_states is not None else torch.get_rng_state())
        return _to_cpu({
            "epoch": epoch, "model": model.state_dict(), "opt": adam.state_dict(),
            "ref_sum": [t[g].view(w.shape[0] // G, *w.shape[1:]).clone()
                        for t, w in zip(ref_sum, weights, strict=True)],
            "ref_count": int(ref_count[g]), "gen": gens[g].get_state(), "torch_rng": rng,
            "best_val": float(best_val[g]), "best_rec": float(best_rec[g]),
            "snaps": snaps[g], "history": histories[g],
            "seconds": float(seconds_before[g] + time.perf_counter() - t_start)})

    stream = stream if stream is not None else (torch.cuda.Stream(dev) if use_graphs else None)
    if stream is not None:  # the data and weights were made on the default stream
        stream.wait_stream(torch.cuda.current_stream(dev))

    def on_stream():
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    for epoch in range(first_epoch, epochs):
        with on_stream():
            order = torch.full((G, iters * batch_size), -1, dtype=torch.long)
            for g, gen in enumerate(gens):
                order[g, :len(trains[g])] = torch.randperm(len(trains[g]), generator=gen)
            order = order.to(dev)
            sums.zero_()
            vsums.zero_()
            for e in epoch_grad:
                e.zero_()
            for it in range(iters):
                idx_buf.copy_(order[:, it * batch_size:(it + 1) * batch_size])
                train_graph = run(train_step, train_graph)
            for j in range(v_iters):
                val_graphs[j] = run(lambda j=j: val_step(j), val_graphs[j])
        yield
        with on_stream():
            avg = ref_avg()
            ref_cos = torch.stack([_cos_rows(e, a) for e, a in zip(epoch_grad, avg, strict=True)]).mean(0)
            train = (sums / n_train[:, None]).cpu().numpy()
            val = (vsums / n_val[:, None]).cpu().numpy()
            ref_cos = ref_cos.cpu().numpy()
            for g in range(G):
                histories[g].append({k: float(v) for k, v in {
                    "epoch": epoch + 1, "train_loss": train[g, 0], "train_recon": train[g, 1],
                    "train_grad_loss": train[g, 2], "val_loss": val[g, 0], "val_recon": val[g, 1],
                    "val_grad_loss": val[g, 2], "ref_cos_epoch_grad": ref_cos[g]}.items()})
                is_best = val[g, 0] < best_val[g]  # the official rule, as in the notebook
                best_val[g] = min(best_val[g], val[g, 0])
                if is_best and (epoch % 5 == 0 or epoch == epochs - 1):
                    snaps[g]["faithful"] = snapshot(g, epoch + 1)
                if val[g, 1] < best_rec[g]:
                    best_rec[g] = val[g, 1]
                    snaps[g]["corrected"] = snapshot(g, epoch + 1)
            if on_state and save_every and (epoch + 1) % save_every == 0 and epoch + 1 < epochs:
                for g in range(G):
                    on_state(g, notebook_state(g, epoch + 1))
    with on_stream():
        for g in range(G):
            snaps[g]["last"] = snapshot(g, epochs)
    if stream is not None:
        stream.synchronize()  # the snapshots are read on other streams afterwards
    return snaps, histories


def train_together(models: list[nn.Module], trains: list[Tensor], vals: list[Tensor],
                   seeds: list[int], *, epochs: int, batch_size: int = 64, lr: float = 1e-3,
                   alpha: float = 0.03, use_grad_loss: bool = True, progress: bool = True,
                   budget_seconds: float | None = None, cuda_graphs: bool = True,
                   grouped: bool | None = None, noise_states: list[Tensor] | None = None,
                   states: list[dict | None] | None = None, save_every: int = 0,
                   on_state: Callable[[int, dict], None] | None = None,
                   ) -> tuple[list[dict], list[list[dict]]]:
    """Train the models together; returns each one's snapshots and per-epoch history, in
    the format of the notebook's ``train_gradcon``.

    ``grouped`` (default: on the CPU) stacks all models as grouped convolutions. Otherwise
    (default on a GPU) each model gets its own CUDA stream and graphs, and the streams run
    side by side: cuDNN's grouped convolutions measured slower on the H200 than separate
    small ones running concurrently. With ``budget_seconds``, stop early (``TimeoutError``)
    when the pace of epochs 3 and 4 projects a longer run. ``noise_states``: for VAEs on the
    CPU, the state each model's sampling generator starts from (``torch.get_rng_state()``
    right after making the model, as the notebook's global generator stands).

    ``states`` (None for a model that starts afresh): training states in the format of the
    notebook's ``.state.pt`` files, written by the notebook or by ``on_state``; those models
    continue from them, the result the same as without the interruption (tested). Every
    ``save_every`` epochs, ``on_state(i, state)`` receives model i's state.
    """
    dev = trains[0].device
    grouped = dev.type != "cuda" if grouped is None else grouped
    states = states or [None] * len(models)
    first = [s["epoch"] if s else 0 for s in states]
    if grouped:  # one group per epoch to resume from: a group steps its models together
        parts = [[i for i in range(len(models)) if first[i] == e] for e in sorted(set(first))]
    else:
        parts = [[i] for i in range(len(models))]

    def report(p):
        return None if on_state is None else (lambda g, state: on_state(p[g], state))

    runs = [(first[p[0]], p, _train_epochs(
                [models[i] for i in p], [trains[i] for i in p], [vals[i] for i in p],
                [seeds[i] for i in p], epochs=epochs, batch_size=batch_size, lr=lr, alpha=alpha,
                use_grad_loss=use_grad_loss, cuda_graphs=cuda_graphs,
                stream=torch.cuda.Stream(dev) if dev.type == "cuda" else None,
                noise_states=[noise_states[i] for i in p] if noise_states else None,
                resume=[states[i] for i in p] if states[p[0]] else None,
                save_every=save_every, on_state=report(p)))
            for p in parts]
    desc = f"train {len(models)} models " + ("grouped" if grouped else "side by side")
    start_epoch = min(first)
    start = time.perf_counter()
    for epoch in trange(start_epoch, epochs, initial=start_epoch, total=epochs, desc=desc,
                        unit="epoch", disable=not progress, mininterval=10):
        if epoch == start_epoch + 2:
            pace_start = time.perf_counter()
        if budget_seconds and epoch == start_epoch + 4:
            projected = ((pace_start - start) +
                         (time.perf_counter() - pace_start) / 2 * (epochs - start_epoch - 2))
            if projected > budget_seconds:
                raise TimeoutError(f"{epochs - start_epoch} epochs would take about "
                                   f"{projected:.0f} s, over the budget of {budget_seconds:.0f} s")
        for begins, _, run in runs:
            if epoch >= begins:
                next(run)
    snaps: list[dict | None] = [None] * len(models)
    histories: list[list[dict] | None] = [None] * len(models)
    for _, p, run in runs:
        try:
            next(run)
        except StopIteration as done:
            for i, s, h in zip(p, *done.value, strict=True):
                snaps[i], histories[i] = s, h
        else:
            raise RuntimeError("a training generator ran past its epochs")
    return snaps, histories


def checkpoint_path(train_params: dict) -> Path:
    """Where the notebook looks for this training run (its key is the same hash)."""
    key = hashlib.sha1(json.dumps(train_params, sort_keys=True).encode()).hexdigest()[:10]
    p = train_params
    return (checkpoint_dir() / "gradcon" /
            f"{p['dataset']}_class{p['normal_class']}_{p['variant']}_seed{p['seed']}_{key}.pt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--classes", nargs="+", default=["all"], help="class indices or 'all'")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--protocol", default="gradcon50")
    ap.add_argument("--variant", default="cae_grad", choices=VARIANTS)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--alpha", type=float, default=0.03)
    ap.add_argument("--init", default="official", choices=["official", "mean_output"],
                    help="the notebook's init parameter (mean_output: output bias at the mean pixel)")
    ap.add_argument("--max-train", type=int, default=0)
    ap.add_argument("--max-test", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-root", default="")
    ap.add_argument("--summary", default="", help="write a JSON summary (timings) here")
    ap.add_argument("--force", action="store_true", help="retrain even if checkpoints exist")
    ap.add_argument("--budget-seconds", type=float, default=0,
                    help="give up after 4 epochs if the whole run would take longer")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="launch every kernel from Python")
    ap.add_argument("--grouped", action="store_true",
                    help="on a GPU too, stack the models as grouped convolutions (one stream)")
    ap.add_argument("--save-every", type=int, default=25,
                    help="epochs between resumable training states (*.state.pt, the notebook's "
                         "format; 0: none). A run that finds one continues from it")
    args = ap.parse_args(argv)

    dev = get_device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # as the notebook: full float32 convolutions
    torch.backends.cudnn.benchmark = True
    n_classes = len(dataset_info(args.dataset).class_names)
    classes = (list(range(n_classes)) if args.classes == ["all"]
               else [int(c) if c.isdigit() else c for c in args.classes])
    in_channels = 3 if args.dataset == "cifar10" else 1
    model_cell = notebook_model_cell(args.variant, in_channels)
    model_class = model_cell["GradConVAE" if args.variant.startswith("vae") else "GradConCAE"]
    models, trains, vals, seeds, params, paths, noise_states, states = [], [], [], [], [], [], [], []
    for seed in args.seeds:
        for c in classes:
            split = load_one_class(args.dataset, c, protocol=args.protocol, seed=seed,
                                   data_root=args.data_root or None, image_size=28,
                                   channels=in_channels, max_train=args.max_train or None,
                                   max_test=args.max_test or None)
            p = {"dataset": args.dataset, "normal_class": split.normal_class,
                 "protocol": args.protocol, "seed": seed, "variant": args.variant,
                 "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                 "alpha": args.alpha, "max_train": args.max_train, "max_test": args.max_test,
                 "n_train": len(split.train)}
            if args.init != "official":  # as the notebook's key
                p["init"] = args.init
            path = checkpoint_path(p)
            if path.exists() and not args.force:
                print(f"exists, skipped: {path}")
                continue
            seed_everything(seed)  # the notebook's first draw after seeding is the model
            model = model_class(in_channels)
            if args.init == "mean_output":
                model_cell["set_output_bias_to_mean"](model, torch.from_numpy(split.train))
            models.append(model)
            noise_states.append(torch.get_rng_state())  # where the notebook's VAE draws from
            state_path = path.with_suffix(".state.pt")
            if state_path.exists() and not args.force:
                states.append(torch.load(state_path, map_location=dev, weights_only=True))
                print(f"resuming from {state_path.name} after epoch {states[-1]['epoch']}")
            else:
                states.append(None)
            trains.append(torch.from_numpy(split.train).to(dev))
            vals.append(torch.from_numpy(split.val).to(dev))
            seeds.append(seed)
            params.append(p)
            paths.append(path)
    if not models:
        print("nothing to train")
        return 0
    print(f"{describe_device(dev)}: training {len(models)} models together, {args.epochs} epochs")

    def save_state(i: int, state: dict) -> None:
        save_checkpoint(state, paths[i].with_suffix(".state.pt"))

    start = time.perf_counter()
    try:
        snaps, histories = train_together(
            models, trains, vals, seeds, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, alpha=args.alpha, use_grad_loss=args.variant.endswith("_grad"),
            budget_seconds=args.budget_seconds or None, cuda_graphs=not args.no_cuda_graphs,
            grouped=True if args.grouped else None, noise_states=noise_states, states=states,
            save_every=args.save_every, on_state=save_state if args.save_every else None)
    except TimeoutError as err:
        print(f"stopped, nothing saved: {err}")
        return 3
    seconds = time.perf_counter() - start
    trainer = {"name": "benchmarks/gradcon_together.py", "models_together": len(models),
               "cuda_graphs": dev.type == "cuda" and not args.no_cuda_graphs,
               "layout": ("grouped convolutions" if args.grouped or dev.type != "cuda"
                          else "one CUDA stream per model"),
               "wall_seconds_all_models": seconds, "device": describe_device(dev)}
    for p, path, s, h, state in zip(params, paths, snaps, histories, states, strict=True):
        resumed = {"resumed_after_epoch": state["epoch"]} if state else {}
        save_checkpoint({"params": p, "snapshots": _to_cpu(s), "history": h,
                         "train_seconds": seconds + (state["seconds"] if state else 0.0),
                         "trainer": {**trainer, **resumed}}, path)
        path.with_suffix(".state.pt").unlink(missing_ok=True)
        print(f"saved {path}")
    firsts = [s["epoch"] if s else 0 for s in states]
    iterations = sum((args.epochs - e) * math.ceil(len(t) / args.batch_size)
                     for t, e in zip(trains, firsts, strict=True))
    summary = {"benchmark": "gradcon_together", **trainer, "epochs": args.epochs,
               "classes": classes, "seeds": args.seeds, "model_iterations": iterations,
               "seconds_per_epoch": seconds / (args.epochs - min(firsts)), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit()}
    print(json.dumps(summary, indent=1))
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
