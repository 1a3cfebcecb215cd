"""The MAML meta-batch run as one vectorised computation: ``torch.func.vmap`` over tasks.

The sequential loop (:meth:`MAML.meta_loss` once per episode) is the reference; this module
computes the same adapted weights, query losses and meta-gradients with every task of a
meta-batch at once. Inside ``vmap`` the fast weights gain a task dimension and the inner
gradients come from ``torch.func.grad`` (``torch.autograd.grad`` cannot run under vmap);
the outer ``backward`` differentiates through it as through the sequential loop (second
order unless ``first_order``). BatchNorm statistics stay per task: each task's batch is
normalised by its own statistics, as transductive MAML needs.

Where vmap cannot apply, :func:`meta_loss_batch` returns ``None`` (the caller runs the
sequential loop) after one warning naming the reason: the ``running`` BatchNorm policy in
training (its outer query pass updates shared running averages in place),
``checkpoint_inner`` and ``profile_memory`` (hooks and checkpoints are not vmap-able),
episodes of different shapes, or a backbone whose operations have no batching rule (e.g.
in-place updates of its own buffers), reported by vmap itself. The training loop
(``train.meta_batch``, :meth:`fewshot_nsl.runner.MetaTrainer.gradient_step`) is its user.

Speed: on a 2-core CPU the vectorised meta-batch is SLOWER than the sequential loop (about
2× at 28×28, meta-batch 8, Conv-4-32, one thread, under load; docs/benchmarks.md): the CPU
sequential loop is bound by arithmetic, not per-operation overhead, a convolution grouped
over tasks is no faster than one convolution per task, and the batch-statistics BatchNorm
spelt out in elementary operations costs memory traffic the fused kernel does not. It is
meant for accelerators, where one launch per operation for all tasks is what saves time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from episodes import Episode
from fewshot_nsl.learners.base import similarity_penalty_term, warn_sequential_once

if TYPE_CHECKING:
    from fewshot_nsl.learners.maml import MAML


def _batch_norm_by_batch_statistics(norm: nn.modules.batchnorm._BatchNorm):
    """``norm``'s forward with the batch's statistics, written out in elementary operations:
    ``(x − mean) / sqrt(var + eps) · γ + β`` over all dimensions but the channels'.

    The fused ``native_batch_norm`` gives wrong second derivatives under ``vmap`` of
    ``torch.func.grad`` (torch 2.13 CPU: 2.4 % off on a Conv-4 meta-gradient, found by finite
    differences); these operations have exact batching rules. Running buffers are neither
    read nor written, as in the transductive policies."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
        out = (x - mean) * torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            out = out * norm.weight.view(shape)
        if norm.bias is not None:
            out = out + norm.bias.view(shape)
        return out

    return forward


@contextlib.contextmanager
def batch_statistics_only(module: nn.Module) -> Iterator[None]:
    """Every BatchNorm in ``module`` normalises by the batch's statistics and neither reads
    nor writes its running buffers (what the transductive policies compute), through
    :func:`_batch_norm_by_batch_statistics` (no in-place buffer update, which vmap rejects)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.forward = _batch_norm_by_batch_statistics(m)
    try:
        yield
    finally:
        for m in norms:
            del m.forward


def sequential_fallback_reason(learner: MAML, episodes: Sequence[Episode]) -> str | None:
    """Why the meta-batch cannot be vectorised, or None when it can."""
    if learner.bn == "running" and learner.training:
        return "bn='running' updates shared running averages in training"
    if learner.checkpoint_inner:
        return "checkpoint_inner is not vmap-able"
    if learner.profile_memory:
        return "profile_memory hooks are not vmap-able"
    shapes = {(e.way, tuple(e.support_x.shape), tuple(e.query_x.shape)) for e in episodes}
    if len(shapes) != 1:
        return f"episodes of different shapes {sorted(shapes)}"
    return None


def sequential_meta_loss(
    learner: MAML, episodes: Sequence[Episode]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: mean over tasks of :meth:`MAML.meta_loss` (loss, accuracy)."""
    results = [learner.meta_loss(episode) for episode in episodes]
    loss = torch.stack([loss for loss, _ in results]).mean()
    accuracy = torch.stack([accuracy for _, accuracy in results]).mean()
    return loss, accuracy


def vectorised_meta_loss(
    learner: MAML, episodes: Sequence[Episode]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean query loss (+ similarity penalty) and accuracy of ``episodes``, all tasks in one
    ``vmap``. Same value and gradients as :func:`sequential_meta_loss` (to rounding)."""
    from fewshot_nsl.learners.maml import classification_loss

    way = episodes[0].way
    shots = episodes[0].support_y.shape[0] // way
    for episode in episodes:
        learner._check_task(episode.support_x, episode.support_y, episode.way)
    support_x = torch.stack([e.support_x for e in episodes])
    support_y = torch.stack([e.support_y for e in episodes])
    query_x = torch.stack([e.query_x for e in episodes])
    query_y = torch.stack([e.query_y for e in episodes])

    params = dict(learner.model.named_parameters())
    if not torch.is_grad_enabled():
        params = {name: p.detach() for name, p in params.items()}
    buffers = dict(learner.model.named_buffers())
    adapted = learner.adapted_names
    steps = learner.inner_steps if learner.training else learner.inner_steps_eval
    first_order = learner.first_order or not learner.training
    rates = {
        name: learner.inner_lrs[name.replace(".", "-")] if learner.meta_sgd else learner.inner_lr
        for name in adapted
    }

    def logits_of(fast: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(learner.model, ({**params, **fast}, buffers), (x,))

    def support_loss(fast, x, y):
        return classification_loss(logits_of(fast, x), y, learner.inner_loss_reduction, shots)

    def task(sx, sy, qx, qy):
        fast = {name: params[name] for name in adapted}
        for _ in range(steps):
            grads = grad(support_loss)(fast, sx, sy)
            if first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            fast = {name: fast[name] - rates[name] * grads[name] for name in adapted}
        logits = logits_of(fast, qx)
        loss = classification_loss(logits, qy, learner.query_loss_reduction, shots)
        accuracy = (logits.argmax(dim=-1) == qy).float().mean()
        return loss, accuracy

    with batch_statistics_only(learner.model):
        losses, accuracies = vmap(task, randomness="error")(support_x, support_y, query_x, query_y)
    penalty = similarity_penalty_term(learner.model, learner.similarity_penalty)
    return losses.mean() + penalty, accuracies.mean().detach()


def meta_loss_batch(
    learner: MAML, episodes: Sequence[Episode]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`vectorised_meta_loss` of the meta-batch, or ``None`` (after one warning per
    reason) where vmap cannot apply (module docstring): the caller then runs the tasks one
    by one."""
    if not episodes:
        raise ValueError("meta_loss_batch needs at least one episode")
    reason = sequential_fallback_reason(learner, episodes)
    if reason is None:
        try:
            return vectorised_meta_loss(learner, episodes)
        except RuntimeError as error:  # an operation without a batching rule
            if "vmap" not in str(error) and "batch" not in str(error).lower():
                raise
            reason = f"vmap failed: {str(error).splitlines()[0]}"
    warn_sequential_once(reason)
    return None
