"""Per-sample gradients, vectorised with ``torch.func`` (used by GradCon and the Fisher chapter).

A loop of one backward pass per sample is the obvious way and the slow one; ``vmap`` over
``grad`` computes the same numbers for a whole batch in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def per_sample_gradients(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                         inputs: Tensor, param_names: Iterable[str] | None = None,
                         batch_size: int = 256) -> dict[str, Tensor]:
    """Gradient of ``loss_fn(model(x), x)`` for each sample ``x`` of ``inputs``.

    ``loss_fn`` gets the model's output for *one* sample (with a batch axis of 1) and that
    sample, and returns a scalar. Only the parameters named in ``param_names`` (default: all
    trainable ones) are differentiated; the result maps each name to a tensor of shape
    ``(N, *param.shape)``, detached.
    """
    params = dict(model.named_parameters())
    names = list(param_names) if param_names is not None else [
        n for n, p in params.items() if p.requires_grad]
    unknown = set(names) - set(params)
    if unknown:
        raise KeyError(f"model has no parameters {sorted(unknown)}")
    chosen = {n: params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in params.items() if n not in chosen}
    frozen.update(dict(model.named_buffers()))

    def sample_loss(chosen_params: dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **chosen_params}, (x[None],))
        return loss_fn(out, x[None])

    batched = vmap(grad(sample_loss), in_dims=(None, 0))
    pieces: dict[str, list[Tensor]] = {n: [] for n in names}
    for start in range(0, len(inputs), batch_size):
        grads = batched(chosen, inputs[start:start + batch_size])
        for n in names:
            pieces[n].append(grads[n].detach())
    return {n: torch.cat(v) for n, v in pieces.items()}


def flatten_gradients(grads: dict[str, Tensor]) -> Tensor:
    """Concatenate per-sample gradients into one ``(N, P)`` matrix."""
    return torch.cat([g.flatten(start_dim=1) for g in grads.values()], dim=1)


def loop_gradients(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                   inputs: Tensor, param_names: Iterable[str]) -> dict[str, Tensor]:
    """The reference: one forward and backward pass per sample (slow; for checks)."""
    names = list(param_names)
    params = dict(model.named_parameters())
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for x in inputs:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[None]), x[None]).backward()
        for n in names:
            out[n].append(params[n].grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}


def cosine_to_reference(per_sample: Tensor, reference: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine between each row of ``per_sample`` (N, ...) and one ``reference`` tensor, (N,).

    Matches ``F.cosine_similarity(g.reshape(1, -1), reference.reshape(1, -1), eps=eps)`` row by
    row: each norm is clamped to ``eps`` on its own. Clamping the *product* of the norms instead
    is wrong for small gradients (a well-reconstructed image's layer gradient can have a norm of
    1e-6 against a reference of 1e-4, a product far below 1e-8).
    """
    rows = per_sample.flatten(start_dim=1)
    ref = reference.reshape(-1)
    unit_rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(eps)
    return unit_rows @ (ref / ref.norm().clamp_min(eps))


def relative_error(computed: Tensor, expected: Tensor) -> float:
    """``max |computed - expected| / max |expected|``, for checks against a reference result.

    Exactly zero gradients are legitimate (a collapsed autoencoder can have them), so two all-zero tensors agree (0.0) instead of giving 0/0 = nan, and a non-zero
    result against an all-zero reference is infinitely wrong.
    """
    diff = float((computed - expected).abs().max())
    scale = float(expected.abs().max())
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale
