"""The MAML meta-batch run as one vectorised computation, in two forms.

The sequential loop (:meth:`MAML.meta_loss` once per episode) is the reference; this module
computes the same adapted weights, query losses and meta-gradients with every task of a
meta-batch at once (:func:`vectorised_meta_loss`). The fast weights gain a task dimension
and BatchNorm statistics stay per task: each task's batch is normalised by its own
statistics, as transductive MAML needs. The outer ``backward`` differentiates through the
inner loop as through the sequential loop (second order unless ``first_order``).

* **Folded** (:func:`task_folded_meta_loss`), for a classifier on a plain Conv-4 (plain
  ``nn.Conv2d`` and ``nn.BatchNorm2d`` blocks, :func:`task_folded_supported`): the tasks are
  folded into the channels, ``(B, T·C, H, W)``, each convolution is one convolution grouped
  over tasks, each BatchNorm the fused kernel over the T·C channels (per task, per channel),
  the head one batched product; one ``torch.autograd.grad`` of the summed support losses
  gives every task's inner gradient. The tasks run in chunks whose largest map stays about
  the size of a core's L2 cache per intra-op thread (:data:`FOLDED_CHUNK_BYTES`).
* **vmap** (:func:`vmap_meta_loss`), for any other backbone (NSL layers, custom ones): the
  functional inner loop of one task under ``torch.func.vmap`` over tasks, inner gradients
  by ``torch.func.grad`` (``torch.autograd.grad`` cannot run under vmap), BatchNorm from
  elementary operations (:func:`batch_statistics_only`).

Where neither applies, :func:`meta_loss_batch` returns ``None`` (the caller runs the
sequential loop) after one warning naming the reason: the ``running`` BatchNorm policy
(in training its outer query pass updates shared running averages in place; in evaluation
it normalises by them, which neither form does), ``checkpoint_inner`` and
``profile_memory`` (hooks and checkpoints are not vmap-able), episodes of different shapes,
or a backbone whose operations have no batching rule (e.g. in-place updates of its own
buffers), reported by vmap itself. The training loop (``train.meta_batch``,
:meth:`fewshot_nsl.runner.MetaTrainer.gradient_step`) is its user.

Speed on this 2-core CPU (docs/benchmarks.md, issue 14): the folded form is faster than the
sequential loop where each task is small (the Omniglot reference: Conv-4-64, 1 query per
class, 28×28 grey, meta-batch 32: 1.19× at one thread, 1.86× at two, at low load; the
grouped convolutions alone bound it near 1.4× and 1.9×), where it removes the sequential
loop's per-operation overhead; it is 0.83-1.00× at Conv-4-32 with 15 queries per class
(28×28 and 84×84), where each task's operations are already large and bound by arithmetic
and memory traffic, which folding does not reduce. The vmap form was slower than the
sequential loop at Conv-4-32 (0.14-0.77×) and 1.07× (one thread) / 1.86× (two) at the
Omniglot shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from episodes import Episode
from fewshot_nsl.backbones.pooling import activate_and_pool
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
    if learner.bn == "running":  # both vectorised forms normalise by batch statistics
        if learner.training:
            return "bn='running' updates shared running averages in training"
        return "bn='running' normalises by running averages in evaluation"
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


def stack_episodes(
    episodes: Sequence[Episode],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support and query images and labels of the tasks stacked on a leading task dimension:
    ``(T, N·K, C, H, W)``, ``(T, N·K)``, ``(T, N·Q, C, H, W)``, ``(T, N·Q)``."""
    return (
        torch.stack([e.support_x for e in episodes]),
        torch.stack([e.support_y for e in episodes]),
        torch.stack([e.query_x for e in episodes]),
        torch.stack([e.query_y for e in episodes]),
    )


def vectorised_meta_loss(
    learner: MAML, episodes: Sequence[Episode]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean query loss (+ similarity penalty) and accuracy of ``episodes``, all tasks at once:
    by :func:`task_folded_meta_loss` where the model is a plain Conv-4 classifier
    (:func:`task_folded_supported`), else in one ``vmap``. Same value and gradients as
    :func:`sequential_meta_loss` (to rounding)."""
    for episode in episodes:
        learner._check_task(episode.support_x, episode.support_y, episode.way)
    if task_folded_supported(learner.model):
        return task_folded_meta_loss(learner, episodes)
    return vmap_meta_loss(learner, episodes)


def _inner_settings(learner: MAML) -> tuple[int, bool, dict[str, torch.Tensor | float]]:
    """Inner steps, first order or not, and the inner learning rate of every adapted name,
    as :meth:`MAML.adapt` chooses them (training or evaluation, Meta-SGD or not)."""
    steps = learner.inner_steps if learner.training else learner.inner_steps_eval
    first_order = learner.first_order or not learner.training
    rates = {
        name: learner.inner_lrs[name.replace(".", "-")] if learner.meta_sgd else learner.inner_lr
        for name in learner.adapted_names
    }
    return steps, first_order, rates


def vmap_meta_loss(learner: MAML, episodes: Sequence[Episode]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vectorised_meta_loss` for any vmap-able model: the functional inner loop of one
    task under ``torch.func.vmap`` over tasks, inner gradients by ``torch.func.grad``."""
    from fewshot_nsl.learners.maml import classification_loss

    shots = episodes[0].support_y.shape[0] // episodes[0].way
    support_x, support_y, query_x, query_y = stack_episodes(episodes)
    params = dict(learner.model.named_parameters())
    if not torch.is_grad_enabled():
        params = {name: p.detach() for name, p in params.items()}
    buffers = dict(learner.model.named_buffers())
    adapted = learner.adapted_names
    steps, first_order, rates = _inner_settings(learner)

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


# -- tasks folded into channels: plain Conv-4 as grouped convolutions ---------------------------

#: Layers a plain Conv-4 block may hold around its convolution and BatchNorm that act on each
#: channel (or each map) alone, so they act on task-folded maps as on one task's maps.
_CHANNELWISE = (nn.Identity, nn.ReLU, nn.MaxPool2d)


def task_folded_supported(model: nn.Module) -> bool:
    """Whether ``model`` is a classifier :func:`task_folded_logits` computes: a
    :class:`~fewshot_nsl.backbones.conv4.Conv4` backbone of plain ``nn.Conv2d`` (zero padding)
    and ``nn.BatchNorm2d`` blocks, and a linear head."""
    from fewshot_nsl.backbones.conv4 import Conv4, ConvBlock, SamePad2d

    backbone = getattr(model, "backbone", None)
    if type(backbone) is not Conv4 or type(getattr(model, "head", None)) is not nn.Linear:
        return False
    for block in backbone.blocks:
        if (
            type(block) is not ConvBlock
            or type(block.conv) is not nn.Conv2d
            or block.conv.padding_mode != "zeros"
            or isinstance(block.conv.padding, str)  # "same"/"valid": GroupedConv2d takes pairs
            or type(block.norm) is not nn.BatchNorm2d
            or not isinstance(block.pad, (SamePad2d, nn.Identity))
            or not isinstance(block.relu, _CHANNELWISE)
            or not isinstance(block.pool, _CHANNELWISE)
        ):
            return False
    return True


class GroupedConv2d(torch.autograd.Function):
    """``F.conv2d(x, weight, None, stride, padding, dilation, groups)`` whose input gradient is
    ``F.conv_transpose2d`` of the output gradient (the same sums as the convolution's own
    backward). Why: for a convolution grouped over tasks on this CPU (oneDNN, torch 2.13) the
    transposed convolution was twice as fast as the input-gradient kernel (layer 2 of 32
    Omniglot tasks: 9.7 against 19 ms), and differentiating it (the second-order
    meta-gradient) avoids the double backward of a grouped convolution, which runs one
    convolution per group; the folded meta-step was 1.04-1.07× faster at two threads, 1.02×
    at one (docs/benchmarks.md, issue 14). The backward is made of differentiable operations,
    so the function has exact derivatives of every order (tests: gradcheck, gradgradcheck).
    ``stride``, ``padding``, ``dilation``: pairs; ``groups``: an int."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.options = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.options
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # the transposed convolution's output side falls short of the input's by the rows
            # and columns no window of the strided convolution reached: output_padding
            output_padding = [
                x.shape[2 + i]
                - (
                    (grad_output.shape[2 + i] - 1) * stride[i]
                    - 2 * padding[i]
                    + dilation[i] * (weight.shape[2 + i] - 1)
                    + 1
                )
                for i in range(2)
            ]
            grad_x = F.conv_transpose2d(
                grad_output, weight, None, stride, padding, output_padding, groups, dilation
            )
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.convolution_backward(
                grad_output,
                x,
                weight,
                None,
                stride,
                padding,
                dilation,
                False,
                [0, 0],
                groups,
                [False, True, False],
            )[1]
        return grad_x, grad_weight, None, None, None, None


def _conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """``F.conv2d`` without bias, with :class:`GroupedConv2d`'s arguments."""
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


def fold_tasks(x: torch.Tensor) -> torch.Tensor:
    """Images of T tasks ``(T, B, C, H, W)`` → one batch with the tasks in the channels,
    task-major: ``(B, T·C, H, W)``."""
    tasks, batch, channels = x.shape[:3]
    return x.transpose(0, 1).reshape(batch, tasks * channels, *x.shape[3:])


def task_folded_logits(
    model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, tasks: int
) -> torch.Tensor:
    """The logits of ``model`` (:func:`task_folded_supported`) for T tasks at once, each with
    its own weights: ``x`` ``(B, T·C, H, W)`` (:func:`fold_tasks`), ``weights`` every parameter
    by name with a leading task dimension ``(T, *shape)`` → logits ``(B, T, way)``.

    Each convolution is one grouped convolution (``groups = T``: task t's input channels meet
    only task t's kernels); each BatchNorm normalises each of the T·C channels by its batch
    statistics, which are task t's statistics of its channel (transductive batch norm, per
    task, as the sequential loop computes it; running buffers untouched); the head is one
    batched matrix product. Same computation as the module's forward on each task, in
    another order of summation."""
    h = x
    for index, block in enumerate(model.backbone.blocks):
        prefix = f"backbone.blocks.{index}."
        conv, norm = block.conv, block.norm
        # one task: the plain convolution (GroupedConv2d's input gradient was slower there:
        # 0.95x at Conv-4-32 28x28, docs/benchmarks.md)
        convolve = GroupedConv2d.apply if tasks * conv.groups > 1 else _conv2d
        h = convolve(
            block.pad(h),
            weights[prefix + "conv.weight"].flatten(0, 1),
            conv.stride,
            conv.padding,
            conv.dilation,
            tasks * conv.groups,
        )
        bias = weights.get(prefix + "conv.bias")
        if bias is not None:
            h = h + bias.reshape(1, -1, 1, 1)
        scale, offset = weights.get(prefix + "norm.weight"), weights.get(prefix + "norm.bias")
        h = F.batch_norm(
            h,
            None,
            None,
            None if scale is None else scale.flatten(),
            None if offset is None else offset.flatten(),
            training=True,
            eps=norm.eps,
        )
        h = activate_and_pool(block.relu, block.pool, h)
    batch = h.shape[0]
    if model.backbone.pool == "avg":
        features = h.mean(dim=(2, 3)).view(batch, tasks, -1)
    else:  # task t's channels are contiguous: its flattened map, as Conv4.forward's
        features = h.reshape(batch, tasks, -1)
    head = torch.einsum("btd,tkd->btk", features, weights["head.weight"])
    return head + weights["head.bias"]


def task_folded_losses(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str, shots: int
) -> torch.Tensor:
    """Per-task :func:`~fewshot_nsl.learners.maml.classification_loss` ``(T,)`` of task-folded
    logits ``(B, T, way)`` against labels ``(T, B)``."""
    batch, tasks, way = logits.shape
    per_example = F.cross_entropy(
        logits.reshape(batch * tasks, way), labels.t().reshape(-1), reduction="none"
    ).view(batch, tasks)
    return per_example.mean(0) if reduction == "mean" else per_example.sum(0) / shots


#: Bytes of the largest activation (the first convolution's output) of one chunk of folded
#: tasks, per intra-op thread: about this machine's per-core L2 cache (2 MiB), so the
#: elementwise work on it (BatchNorm and ReLU and their first and second derivatives) stays
#: in cache. Measured (docs/benchmarks.md, issue 14) at the Omniglot reference shapes
#: (Conv-4-64, 5 support and 5 query images of 28×28, 250 KiB a task), meta-batch 32: at one
#: thread chunks of 4-8 tasks were 1.29× the sequential loop where all 32 at once were
#: 1.16×; at two threads chunks of 16 were 2.03× / 1.97× where chunks of 8 were 1.96× /
#: 1.92× (two runs).
FOLDED_CHUNK_BYTES = 2 * 2**20


def folded_chunk(model: nn.Module, episode: Episode) -> int:
    """Tasks per chunk of the folded form: as many as keep one chunk's first convolution
    output (the largest map of a Conv-4: most channels at the largest side) within
    :data:`FOLDED_CHUNK_BYTES` per intra-op thread, at least one."""
    block = model.backbone.blocks[0]
    with torch.no_grad():  # the output shape, from a batch of no image
        empty = episode.query_x.new_empty(0, *episode.query_x.shape[1:])
        per_image = block.conv(block.pad(empty)).shape[1:].numel()
    images = max(episode.support_x.shape[0], episode.query_x.shape[0])
    per_task = images * per_image * episode.query_x.element_size()
    return max(1, FOLDED_CHUNK_BYTES * torch.get_num_threads() // per_task)


def task_folded_meta_loss(
    learner: MAML, episodes: Sequence[Episode]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vectorised_meta_loss` of a plain Conv-4 classifier without vmap:
    :func:`task_folded_query_losses` of the tasks in chunks of :func:`folded_chunk` tasks."""
    chunk = folded_chunk(learner.model, episodes[0])
    shots = episodes[0].support_y.shape[0] // episodes[0].way
    losses, accuracies = zip(
        *(
            task_folded_query_losses(learner, episodes[start : start + chunk], shots)
            for start in range(0, len(episodes), chunk)
        )
    )
    penalty = similarity_penalty_term(learner.model, learner.similarity_penalty)
    return torch.cat(losses).mean() + penalty, torch.cat(accuracies).mean().detach()


def task_folded_query_losses(
    learner: MAML, episodes: Sequence[Episode], shots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query losses and accuracies ``(T,)`` of each task after its inner loop, all T at once:
    every weight gains a task dimension (the meta-parameters expanded T times, then the fast
    weights), the T tasks run as one network of grouped convolutions
    (:func:`task_folded_logits`), and one ``torch.autograd.grad`` of the sum of the T support
    losses gives each task's inner gradient (the tasks share no weight, so task t's loss
    alone depends on task t's weights). Second order unless ``first_order``, as
    :meth:`MAML.adapt`."""
    tasks = len(episodes)
    support_x, support_y, query_x, query_y = stack_episodes(episodes)
    support_x, query_x = fold_tasks(support_x), fold_tasks(query_x)
    meta_graph = torch.is_grad_enabled()
    params = dict(learner.model.named_parameters())
    if not meta_graph:
        params = {name: p.detach() for name, p in params.items()}
    weights = {name: p.expand(tasks, *p.shape) for name, p in params.items()}
    adapted = learner.adapted_names
    steps, first_order, rates = _inner_settings(learner)
    create_graph = meta_graph and not first_order
    with torch.enable_grad():
        for _ in range(steps):
            if not meta_graph:
                weights.update({n: weights[n].detach().requires_grad_() for n in adapted})
            logits = task_folded_logits(learner.model, weights, support_x, tasks)
            loss = task_folded_losses(logits, support_y, learner.inner_loss_reduction, shots)
            fast = [weights[name] for name in adapted]
            grads = torch.autograd.grad(
                loss.sum(), fast, create_graph=create_graph, allow_unused=True
            )
            for name, weight, gradient in zip(adapted, fast, grads):
                if gradient is not None:  # None: the support loss does not depend on it
                    weights[name] = weight - rates[name] * gradient
    if not meta_graph:
        weights = {name: w.detach() for name, w in weights.items()}
    logits = task_folded_logits(learner.model, weights, query_x, tasks)
    losses = task_folded_losses(logits, query_y, learner.query_loss_reduction, shots)
    accuracies = (logits.argmax(dim=-1) == query_y.t()).float().mean(0)
    return losses, accuracies


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
