"""Train many GradCon models at once: every (class, seed) run of a sweep in one process.

    python -m nbutils.methods.gradcon_together --classes all --seeds 0 --epochs 1000 --device cuda

This module is written by hand (it is not exported from a notebook); the model, the
per-image loss, the output-bias initialisation and the checkpoint key it uses are the GradCon
chapter's, imported from ``nbutils.methods.gradcon``.

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
  (``book/runs/bench/gradcon_together_h200_seed0.json``, written when this trainer was
  ``benchmarks/gradcon_together.py``).

Both layouts are one class, ``GroupTrainer`` (a side-by-side run is a group of one per
stream); ``train_together`` drives the groups epoch by epoch.

What each model sees is exactly the chapter's ``train_gradcon`` (``notebooks/gradcon.ipynb``):
same initial weights (the chapter's ``make_model`` after ``seed_everything(seed)``), same
shuffling generator, batches of 64 with a short last batch, the gradient loss against the
cumulative mean of past total-loss gradients (from the second iteration on), Adam, the
official validation loss every epoch and the three snapshots (faithful, corrected, last).
Classes have different numbers of images, so a grouped model whose epoch has ended sits out
the remaining iterations of that epoch: its samples are masked and its Adam step is skipped.
``tests/test_gradcon_together.py`` checks both layouts against ``train_gradcon`` in
float64. (On a GPU, two runs of the same thing already differ: in one comparison here, by up
to 15% in a loss after six epochs. cuDNN's kernels are not deterministic and Adam amplifies it.)

Nothing is lost when a sweep is interrupted: every ``--save-every`` epochs (25) each model's
whole training state is saved beside its checkpoint in the format of ``train_gradcon``'s
``.state.pt`` files, and the next call continues from it. The formats being one, a run
interrupted here can be finished by the notebook (on a CPU, say), and a notebook run's saved
state can be finished here, beside models that start afresh. ``tests/test_gradcon_together.py``
checks all three against the uninterrupted run in float64.

The checkpoints are written where, and as, the notebook writes them (the chapter's
``checkpoint_params`` and ``checkpoint_path``), so the pipeline's notebook runs then find them
and only score:

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
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nbutils.config import describe_device, get_device, save_checkpoint, seed_everything
from nbutils.data import dataset_info, load_one_class
from nbutils.methods.gradcon import (
    DECODER_CONVS,
    VARIANTS,
    GradConCAE,
    GradConVAE,
    checkpoint_params,
    checkpoint_path,
    make_model,
    per_sample_loss,
    set_output_bias_to_mean,
)
from nbutils.progress import trange
from nbutils.records import git_commit

TRAINER_NAME = "nbutils.methods.gradcon_together"  # the checkpoints' "trainer" says so
LATENT = 576  # the VAE's code size (64 x 3 x 3)


# --- G models as one module -------------------------------------------------------------


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

    def __init__(self, models: list[GradConCAE]):
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

    def __init__(self, models: list[GradConVAE]):
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


# --- one group of models, trained together ------------------------------------------------


class GroupTrainer:
    """Trains G models (grouped convolutions) on one CUDA stream (or the CPU), an epoch at a
    time, as ``train_gradcon`` trains each of them.

    ``queue_epoch(epoch)`` queues an epoch's work without waiting for it, so that a driver can
    queue the epochs of several groups, on several CUDA streams, before any of them waits;
    ``finish_epoch()`` then reads that epoch's losses back, keeps the snapshots and hands out
    training states; ``finish()`` takes the last snapshots and returns (snapshots, histories).
    On a GPU the first epoch runs eagerly (it also warms cuDNN up), then one training
    iteration and each validation batch are captured as CUDA graphs and replayed: the same
    kernels without Python's launch overhead.

    ``resume``: one training state per model, in the format of ``train_gradcon``'s
    ``.state.pt`` files, all after the same epoch; training continues from there. Every
    ``save_every`` epochs (and not after the last), ``on_state(g, state)`` receives model g's
    state in that format, on the CPU, so that the notebook or this trainer can continue it.
    """

    def __init__(self, models: list[GradConCAE], trains: list[Tensor], vals: list[Tensor],
                 seeds: list[int], *, epochs: int, batch_size: int, lr: float, alpha: float,
                 use_grad_loss: bool, cuda_graphs: bool, stream: torch.cuda.Stream | None,
                 noise_states: list[Tensor] | None = None, resume: list[dict] | None = None,
                 save_every: int = 0, on_state: Callable[[int, dict], None] | None = None):
        G, dev, dtype = len(models), trains[0].device, trains[0].dtype
        self.G, self.dev, self.dtype = G, dev, dtype
        self.epochs, self.batch_size, self.lr, self.alpha = epochs, batch_size, lr, alpha
        self.use_grad_loss, self.noise_states = use_grad_loss, noise_states
        self.save_every, self.on_state = save_every, on_state
        self.use_graphs = cuda_graphs and dev.type == "cuda"
        self.vae = isinstance(models[0], GradConVAE)
        self.first_epoch = resume[0]["epoch"] if resume else 0
        if resume:
            assert all(s["epoch"] == self.first_epoch for s in resume), \
                "one group resumes from one epoch"
            models = [copy.deepcopy(m) for m in models]
            for m, s in zip(models, resume, strict=True):
                m.load_state_dict(s["model"])
        self.net = (GroupedVAE if self.vae else GroupedCAE)(models).to(dev, dtype)
        self.template = models[0]
        self.weights = [self.net.up[i].weight for i in DECODER_CONVS]
        self.opt = FlatMaskedAdam(list(self.net.parameters()), G, lr)
        self.ref_sum = [torch.zeros(G, w.numel() // G, device=dev, dtype=dtype)
                        for w in self.weights]
        self.ref_count = torch.zeros(G, device=dev, dtype=dtype)
        self.trains = trains
        self.X, self.n_train = _padded(trains)
        self.V, self.n_val = _padded(vals)
        self.chw = self.X.shape[2:]
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.noise_gens = []  # the VAEs' sampling on the CPU: one generator per model
        for g, s in enumerate(seeds if self.vae else []):
            self.noise_gens.append(torch.Generator())
            if noise_states is not None:
                self.noise_gens[-1].set_state(noise_states[g])
            else:
                self.noise_gens[-1].manual_seed(10_000 + s)
        self.iters = math.ceil(int(self.n_train.max()) / batch_size)
        self.v_iters = math.ceil(int(self.n_val.max()) / batch_size)
        self.rows = torch.arange(G, device=dev)[:, None]
        # static buffers: the captured graphs read and write these very tensors
        self.idx_buf = torch.full((G, batch_size), -1, dtype=torch.long, device=dev)
        self.sums = torch.zeros(G, 3, device=dev, dtype=dtype)
        self.vsums = torch.zeros_like(self.sums)
        self.epoch_grad = [torch.zeros_like(s) for s in self.ref_sum]
        self.v_pos = [torch.arange(j * batch_size, min((j + 1) * batch_size, self.V.shape[1]),
                                   device=dev) for j in range(self.v_iters)]
        # the notebook's names and order of parameters (its Adam state is keyed by position)
        self.names = [n for n, _ in self.net.named_parameters()]
        self.order_of = {n: i for i, (n, _) in enumerate(self.template.named_parameters())}
        self.shapes = {n: p.shape for n, p in self.template.named_parameters()}
        self.offsets = np.cumsum([0, *self.opt.sizes])
        self.train_graph, self.val_graphs = None, [None] * self.v_iters
        self.snaps: list[dict] = [{} for _ in range(G)]
        self.histories: list[list[dict]] = [[] for _ in range(G)]
        self.best_val = np.full(G, np.inf)
        self.best_rec = np.full(G, np.inf)
        self.seconds_before = np.zeros(G)
        for g, s in enumerate(resume or []):
            self._load_state(g, s)
        self.t_start = time.perf_counter()
        self.stream = stream if stream is not None else (
            torch.cuda.Stream(dev) if self.use_graphs else None)
        if self.stream is not None:  # the data and weights were made on the default stream
            self.stream.wait_stream(torch.cuda.current_stream(dev))
        self.pending: int | None = None  # the epoch queued and not yet finished

    # --- the losses, as recon_and_latent and gradient_loss of the chapter, per model ---

    def ref_avg(self) -> list[Tensor]:
        """Each model's running mean of past decoder gradients, (G, P) per layer."""
        return [s / self.ref_count.clamp_min(1)[:, None] for s in self.ref_sum]

    def noise(self, count: Tensor, batch: int) -> Tensor:
        """The VAEs' standard normal draws for one training batch, (G, batch, 576)."""
        G, dtype = self.G, self.dtype
        if self.dev.type == "cuda":  # the default generator: capturable in CUDA graphs
            return torch.randn(G, batch, LATENT, device=self.dev, dtype=dtype)
        eps = torch.zeros(G, batch, LATENT, dtype=dtype)
        for g, n in enumerate(count.tolist()):  # as the notebook: n draws, none once done
            if n:
                eps[g, :n] = torch.randn(n, LATENT, generator=self.noise_gens[g], dtype=dtype)
        return eps

    def recon(self, xb: Tensor, mask: Tensor, training: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Per-model batch reconstruction loss (MSE; the VAEs: BCE summed over pixels) and
        latent loss (the VAEs' KL), both (G,) over the unmasked images, and their number."""
        G, chw = self.G, self.chw
        count = mask.sum(1)
        x_in = xb.transpose(0, 1).reshape(xb.shape[1], -1, *chw[1:])
        if self.vae:
            eps = self.noise(count, xb.shape[1]) if training else None
            out, mu, logvar = self.net(x_in, eps)
        else:
            out = self.net(x_in)
        out = out.view(xb.shape[1], G, *chw).transpose(0, 1)
        per_image = per_sample_loss(out, xb, self.vae)  # (G, batch)
        if self.vae:
            per_latent = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(2)
        else:
            per_latent = torch.zeros_like(per_image)
        n = count.clamp_min(1)
        return (per_image * mask).sum(1) / n, (per_latent * mask).sum(1) / n, count

    def grad_loss(self, rec: Tensor, create_graph: bool) -> Tensor:
        """Each model's gradient loss against its own running reference, (G,)."""
        grads = torch.autograd.grad(rec.sum(), self.weights, create_graph=create_graph,
                                    retain_graph=True)
        return -torch.stack([_cos_rows(g.view(self.G, -1), r)
                             for g, r in zip(grads, self.ref_avg(), strict=True)]).mean(0)

    # --- one training iteration and one validation batch (no host synchronisation) ---

    def train_step(self) -> None:
        """One iteration of every model on the batch indexed by ``idx_buf`` (-1: no image);
        a model without images in it sits the iteration out. Capturable."""
        mask = self.idx_buf >= 0
        active = mask.any(1)
        xb = self.X[self.rows, self.idx_buf.clamp_min(0)]
        self.opt.zero_grad()
        rec, lat, count = self.recon(xb, mask, training=True)
        if self.use_grad_loss:
            gl = self.grad_loss(rec, create_graph=True) * (active & (self.ref_count > 0))
        else:
            gl = torch.zeros(self.G, device=self.dev, dtype=self.dtype)
        loss = rec + lat + self.alpha * gl
        loss.sum().backward()
        with torch.no_grad():
            for s, e, w in zip(self.ref_sum, self.epoch_grad, self.weights, strict=True):
                gw = w.grad.view(self.G, -1) * active[:, None]
                s += gw
                e += gw
            self.ref_count.add_(active)
            self.sums.add_(torch.stack([loss, rec + lat, gl], 1).detach() * count[:, None])
        self.opt.step(active)

    def val_step(self, j: int) -> None:
        """Validation batch ``j`` of every model, as the official test(). Capturable."""
        mask = self.v_pos[j][None, :] < self.n_val[:, None]
        rec, lat, count = self.recon(self.V[:, self.v_pos[j]], mask, training=False)
        gl = self.grad_loss(rec, create_graph=False)
        self.vsums.add_(torch.stack([rec + lat + self.alpha * gl, rec + lat, gl], 1).detach()
                        * count[:, None])

    def _run(self, step: Callable[[], None], graph, epoch: int):
        """Replay ``graph`` if captured; else capture (from the second epoch) or run eagerly."""
        if graph is None and self.use_graphs and epoch > self.first_epoch:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.dev)):
                step()
        if graph is not None:
            graph.replay()
        else:
            step()
        return graph

    def _on_stream(self):
        return (torch.cuda.stream(self.stream) if self.stream is not None
                else contextlib.nullcontext())

    # --- epochs ---

    def step(self, epoch: int) -> None:
        """Finish the epoch queued before (if any), then queue ``epoch``."""
        if self.pending is not None:
            self.finish_epoch()
        self.queue_epoch(epoch)

    def queue_epoch(self, epoch: int) -> None:
        """Queue one epoch: shuffle each model's images with its own generator, train on
        every batch, validate; nothing is read back."""
        with self._on_stream():
            order = torch.full((self.G, self.iters * self.batch_size), -1, dtype=torch.long)
            for g, gen in enumerate(self.gens):
                order[g, :len(self.trains[g])] = torch.randperm(len(self.trains[g]), generator=gen)
            order = order.to(self.dev)
            self.sums.zero_()
            self.vsums.zero_()
            for e in self.epoch_grad:
                e.zero_()
            for it in range(self.iters):
                self.idx_buf.copy_(order[:, it * self.batch_size:(it + 1) * self.batch_size])
                self.train_graph = self._run(self.train_step, self.train_graph, epoch)
            for j in range(self.v_iters):
                self.val_graphs[j] = self._run(functools.partial(self.val_step, j),
                                               self.val_graphs[j], epoch)
        self.pending = epoch

    def finish_epoch(self) -> None:
        """Read the queued epoch's losses back; keep its snapshots by the official rule and
        the corrected one, as ``train_gradcon``; hand out training states when due."""
        epoch, epochs, G = self.pending, self.epochs, self.G
        with self._on_stream():
            avg = self.ref_avg()
            ref_cos = torch.stack([_cos_rows(e, a)
                                   for e, a in zip(self.epoch_grad, avg, strict=True)]).mean(0)
            train = (self.sums / self.n_train[:, None]).cpu().numpy()
            val = (self.vsums / self.n_val[:, None]).cpu().numpy()
            ref_cos = ref_cos.cpu().numpy()
            for g in range(G):
                self.histories[g].append({k: float(v) for k, v in {
                    "epoch": epoch + 1, "train_loss": train[g, 0], "train_recon": train[g, 1],
                    "train_grad_loss": train[g, 2], "val_loss": val[g, 0], "val_recon": val[g, 1],
                    "val_grad_loss": val[g, 2], "ref_cos_epoch_grad": ref_cos[g]}.items()})
                is_best = val[g, 0] < self.best_val[g]  # the official rule, as in the notebook
                self.best_val[g] = min(self.best_val[g], val[g, 0])
                if is_best and (epoch % 5 == 0 or epoch == epochs - 1):
                    self.snaps[g]["faithful"] = self.snapshot(g, epoch + 1)
                if val[g, 1] < self.best_rec[g]:
                    self.best_rec[g] = val[g, 1]
                    self.snaps[g]["corrected"] = self.snapshot(g, epoch + 1)
            if self.on_state and self.save_every and (epoch + 1) % self.save_every == 0 \
                    and epoch + 1 < epochs:
                for g in range(G):
                    self.on_state(g, self.notebook_state(g, epoch + 1))
        self.pending = None

    def finish(self) -> tuple[list[dict], list[list[dict]]]:
        """Finish the last epoch, take the "last" snapshots; (snapshots, histories)."""
        if self.pending is not None:
            self.finish_epoch()
        with self._on_stream():
            for g in range(self.G):
                self.snaps[g]["last"] = self.snapshot(g, self.epochs)
        if self.stream is not None:
            self.stream.synchronize()  # the snapshots are read on other streams afterwards
        return self.snaps, self.histories

    # --- snapshots and training states in the chapter's formats ---

    def snapshot(self, g: int, epoch: int) -> dict:
        """Model g's snapshot as ``train_gradcon`` keeps it: epoch, weights, reference."""
        return {"epoch": epoch, "state": self.net.state_of(g, self.template),
                "ref": [a[g].reshape(w.shape[0] // self.G, *w.shape[1:]).clone()
                        for a, w in zip(self.ref_avg(), self.weights, strict=True)]}

    def notebook_state(self, g: int, epoch: int) -> dict:
        """Model g's training state as ``train_gradcon`` saves it (``.state.pt``)."""
        model = copy.deepcopy(self.template)
        model.load_state_dict(self.net.state_of(g, self.template))
        adam = torch.optim.Adam(model.parameters(), lr=self.lr)
        params = dict(model.named_parameters())
        step = float(self.opt.steps[g])
        for n, a, b in zip(self.names, self.offsets[:-1], self.offsets[1:], strict=True):
            adam.state[params[n]] = {
                "step": torch.tensor(step, dtype=torch.float32),
                "exp_avg": self.opt.m[g, a:b].view(self.shapes[n]).clone(),
                "exp_avg_sq": self.opt.v[g, a:b].view(self.shapes[n]).clone()}
        rng = (self.noise_gens[g].get_state() if self.vae else
               self.noise_states[g] if self.noise_states is not None else torch.get_rng_state())
        return _to_cpu({
            "epoch": epoch, "model": model.state_dict(), "opt": adam.state_dict(),
            "ref_sum": [t[g].view(w.shape[0] // self.G, *w.shape[1:]).clone()
                        for t, w in zip(self.ref_sum, self.weights, strict=True)],
            "ref_count": int(self.ref_count[g]), "gen": self.gens[g].get_state(), "torch_rng": rng,
            "best_val": float(self.best_val[g]), "best_rec": float(self.best_rec[g]),
            "snaps": self.snaps[g], "history": self.histories[g],
            "seconds": float(self.seconds_before[g] + time.perf_counter() - self.t_start)})

    def _load_state(self, g: int, s: dict) -> None:
        """Continue model g from a ``.state.pt`` state (its weights are already loaded)."""
        adam = s["opt"]["state"]
        for n, a, b in zip(self.names, self.offsets[:-1], self.offsets[1:], strict=True):
            self.opt.m[g, a:b] = adam[self.order_of[n]]["exp_avg"].flatten()
            self.opt.v[g, a:b] = adam[self.order_of[n]]["exp_avg_sq"].flatten()
        self.opt.steps[g] = float(adam[self.order_of[self.names[0]]]["step"])
        for total, t in zip(self.ref_sum, s["ref_sum"], strict=True):
            total[g] = t.flatten()
        self.ref_count[g] = s["ref_count"]
        self.gens[g].set_state(s["gen"].cpu())  # loaded onto the device with the rest
        if self.vae:
            self.noise_gens[g].set_state(s["torch_rng"].cpu())
        self.best_val[g], self.best_rec[g] = s["best_val"], s["best_rec"]
        self.snaps[g], self.histories[g] = dict(s["snaps"]), list(s["history"])
        self.seconds_before[g] = s["seconds"]


def train_together(models: list[GradConCAE], trains: list[Tensor], vals: list[Tensor],
                   seeds: list[int], *, epochs: int, batch_size: int = 64, lr: float = 1e-3,
                   alpha: float = 0.03, use_grad_loss: bool = True, progress: bool = True,
                   budget_seconds: float | None = None, cuda_graphs: bool = True,
                   grouped: bool | None = None, noise_states: list[Tensor] | None = None,
                   states: list[dict | None] | None = None, save_every: int = 0,
                   on_state: Callable[[int, dict], None] | None = None,
                   ) -> tuple[list[dict], list[list[dict]]]:
    """Train the models together; returns each one's snapshots and per-epoch history, in
    the format of the chapter's ``train_gradcon``.

    ``grouped`` (default: on the CPU) stacks all models as grouped convolutions. Otherwise
    (default on a GPU) each model gets its own CUDA stream and graphs, and the streams run
    side by side: cuDNN's grouped convolutions measured slower on the H200 than separate
    small ones running concurrently. With ``budget_seconds``, stop early (``TimeoutError``)
    when the pace of epochs 3 and 4 projects a longer run. ``noise_states``: for VAEs on the
    CPU, the state each model's sampling generator starts from (``torch.get_rng_state()``
    right after making the model, as the notebook's global generator stands).

    ``states`` (None for a model that starts afresh): training states in the format of
    ``train_gradcon``'s ``.state.pt`` files, written by the notebook or by ``on_state``; those
    models continue from them, the result the same as without the interruption (tested).
    Every ``save_every`` epochs, ``on_state(i, state)`` receives model i's state.
    """
    dev = trains[0].device
    grouped = dev.type != "cuda" if grouped is None else grouped
    states = states or [None] * len(models)
    first = [s["epoch"] if s else 0 for s in states]
    if grouped:  # one group per epoch to resume from: a group steps its models together
        parts = [[i for i in range(len(models)) if first[i] == e] for e in sorted(set(first))]
    else:
        parts = [[i] for i in range(len(models))]
    streams = [torch.cuda.Stream(dev) if dev.type == "cuda" else None for _ in parts]

    def start(k: int) -> GroupTrainer:
        """The trainer of group k, made when its first epoch comes."""
        p = parts[k]
        report = None if on_state is None else (lambda g, state: on_state(p[g], state))
        return GroupTrainer(
            [models[i] for i in p], [trains[i] for i in p], [vals[i] for i in p],
            [seeds[i] for i in p], epochs=epochs, batch_size=batch_size, lr=lr, alpha=alpha,
            use_grad_loss=use_grad_loss, cuda_graphs=cuda_graphs, stream=streams[k],
            noise_states=[noise_states[i] for i in p] if noise_states else None,
            resume=[states[i] for i in p] if states[p[0]] else None,
            save_every=save_every, on_state=report)

    trainers: list[GroupTrainer | None] = [None] * len(parts)
    desc = f"train {len(models)} models " + ("grouped" if grouped else "side by side")
    start_epoch = min(first)
    t0 = time.perf_counter()
    for epoch in trange(start_epoch, epochs, initial=start_epoch, total=epochs, desc=desc,
                        unit="epoch", disable=not progress, mininterval=10):
        if epoch == start_epoch + 2:
            pace_start = time.perf_counter()
        if budget_seconds and epoch == start_epoch + 4:
            projected = ((pace_start - t0) +
                         (time.perf_counter() - pace_start) / 2 * (epochs - start_epoch - 2))
            if projected > budget_seconds:
                raise TimeoutError(f"{epochs - start_epoch} epochs would take about "
                                   f"{projected:.0f} s, over the budget of {budget_seconds:.0f} s")
        for k, p in enumerate(parts):
            if epoch == first[p[0]]:
                trainers[k] = start(k)
            if epoch >= first[p[0]]:
                trainers[k].step(epoch)
    snaps: list[dict | None] = [None] * len(models)
    histories: list[list[dict] | None] = [None] * len(models)
    for k, p in enumerate(parts):
        if trainers[k] is None:  # nothing left to train (resumed after the last epoch)
            trainers[k] = start(k)
        for i, s, h in zip(p, *trainers[k].finish(), strict=True):
            snaps[i], histories[i] = s, h
    return snaps, histories


# --- the command line ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbutils.methods.gradcon_together",
                                 description=__doc__.split("\n\n")[0],
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
    models, trains, vals, seeds, params, paths, noise_states, states = [], [], [], [], [], [], [], []
    for seed in args.seeds:
        for c in classes:
            split = load_one_class(args.dataset, c, protocol=args.protocol, seed=seed,
                                   data_root=args.data_root or None, image_size=28,
                                   channels=in_channels, max_train=args.max_train or None,
                                   max_test=args.max_test or None)
            p = checkpoint_params(
                dataset=args.dataset, normal_class=split.normal_class, protocol=args.protocol,
                seed=seed, variant=args.variant, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, alpha=args.alpha, max_train=args.max_train, max_test=args.max_test,
                n_train=len(split.train), init=args.init)
            path = checkpoint_path(p)
            if path.exists() and not args.force:
                print(f"exists, skipped: {path}")
                continue
            seed_everything(seed)  # the notebook's first draw after seeding is the model
            model = make_model(args.variant, in_channels)
            if args.init == "mean_output":
                set_output_bias_to_mean(model, torch.from_numpy(split.train))
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
    trainer = {"name": TRAINER_NAME, "models_together": len(models),
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
