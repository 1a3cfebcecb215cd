"""MAML and its NSN presets: one functional inner loop over an unmodified module.

* :class:`MAML` — Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of
  Deep Networks", ICML 2017; options for Meta-SGD (Li et al. 2017, learned per-parameter inner
  learning rates) and ANIL (Raghu et al. 2020, adapt the head only) as a choice of parameters.
* preset ``static_nsn`` — meta-learned static neural similarity (Liu et al., "Neural
  Similarity Learning", NeurIPS 2019): MAML on a backbone of static NSL convolutions
  (``conv.kind="static"``); the similarity matrices ``M`` are outer-loop parameters —
  meta-learned like MAML's initialisation but not changed by the inner loop (the default
  ``frozen=["*.M", ...]``) — while the kernels adapt; ``similarity_penalty`` 5e-3 on ‖M − I‖².
  Letting M adapt too is ``frozen=[]``; adapting only M is ``adapt=["*.M"]``.
* preset ``dynamic_nsn`` — the same paper's dynamic NSN: MAML on a backbone of dynamic NSL
  convolutions (``conv.kind="dynamic"``) whose similarity predictor (hypernetwork, submodule
  ``predictor``) is meta-learned in the outer loop and frozen in the inner loop.

The presets are registrations of :class:`MAML` with other defaults and a required conv kind
(:func:`fewshot_nsl.learners.register_learner`), not subclasses: there is one inner loop.
The inner loop calls the model with ``torch.func.functional_call`` on a dict of fast weights
and differentiates with ``torch.autograd.grad``; the module itself is never copied or edited.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from episodes import Episode
from fewshot_nsl.learners.base import Learner, check_common_options, similarity_penalty_term
from fewshot_nsl.learners.registry import register_learner
from fewshot_nsl.profiling import SavedTensorMeter, StepMemory

BN_POLICIES = ("transductive", "running", "transductive_outer_beta")
#: How the support (inner) and query (outer) cross-entropies are reduced over examples.
#: ``mean``: the mean over the N·K (N·Q) examples. ``sum_over_shots``: the sum over the
#: examples divided by the shots K, as cbfinn/maml's ``utils.xent`` (per-example
#: ``softmax_cross_entropy_with_logits`` / ``update_batch_size``, summed by ``tf.gradients``
#: and ``tf.reduce_sum``): N× the mean for an N-way task with K queries per class.
LOSS_REDUCTIONS = ("mean", "sum_over_shots")
#: Initialisation of the linear head: ``default`` (PyTorch's nn.Linear), ``xavier_uniform``
#: (Glorot uniform weight, zero bias: cbfinn/maml's Mini-ImageNet head) or ``normal``
#: (weight ~ N(0, 1), zero bias: cbfinn/maml's Omniglot head, ``tf.random_normal``).
HEAD_INITS = ("default", "xavier_uniform", "normal")


class Classifier(nn.Module):
    """``backbone`` followed by a linear ``head`` to ``way`` logits: ``(B, C, H, W) → (B, way)``.

    Parameter names are ``backbone.*`` and ``head.*`` (what the adapt/frozen patterns see).
    ``head_init`` is one of :data:`HEAD_INITS`.
    """

    def __init__(self, backbone: nn.Module, way: int, head_init: str = "default") -> None:
        super().__init__()
        out_features = getattr(backbone, "out_features", None)
        if not isinstance(out_features, int) or out_features < 1:
            raise ValueError(
                f"backbone {type(backbone).__name__} must expose 'out_features' (a positive int, "
                f"its feature size), got {out_features!r}; fewshot_nsl.backbones.feature_dim "
                "computes it by a dry run"
            )
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        self.backbone = backbone
        self.head = nn.Linear(out_features, way)
        if head_init != "default":
            with torch.no_grad():
                if head_init == "xavier_uniform":
                    nn.init.xavier_uniform_(self.head.weight)
                else:
                    self.head.weight.normal_(0.0, 1.0)
                self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass
class MAMLState:
    """Adapted task state: every parameter of the classifier by name (fast weights included)."""

    params: dict[str, torch.Tensor]


@contextlib.contextmanager
def batchnorm_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Temporarily set the ``training`` flag of every BatchNorm in ``module`` only."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    previous = [m.training for m in norms]
    for m in norms:
        m.training = training
    try:
        yield
    finally:
        for m, flag in zip(norms, previous):
            m.training = flag


def select_parameters(
    names: Sequence[str], adapt: Sequence[str], frozen: Sequence[str]
) -> list[str]:
    """Names matching any ``adapt`` pattern and no ``frozen`` pattern (fnmatch, in order).

    Raises ``ValueError`` when an ``adapt`` pattern matches nothing (a typo would otherwise
    silently adapt less) or when nothing is left to adapt.
    """
    for pattern in adapt:
        if not fnmatch.filter(names, pattern):
            raise ValueError(
                f"adapt pattern {pattern!r} matches no parameter; parameter names look like "
                f"{list(names[:4])} ... {list(names[-2:])}"
            )
    chosen = [
        name
        for name in names
        if any(fnmatch.fnmatchcase(name, p) for p in adapt)
        and not any(fnmatch.fnmatchcase(name, p) for p in frozen)
    ]
    if not chosen:
        raise ValueError(
            f"adapt={list(adapt)} with frozen={list(frozen)} leaves no parameter to "
            "adapt in the inner loop"
        )
    return chosen


@register_learner(
    "dynamic_nsn",
    conv={"kind": "dynamic"},
    summary="MAML on dynamic NSL convolutions; the similarity predictor is outer-loop only",
)
@register_learner(
    "static_nsn",
    defaults={"similarity_penalty": 5e-3},
    conv={"kind": "static"},
    summary="MAML on static NSL convolutions; M is outer-loop only, penalty 5e-3·Σ‖M − I‖²",
)
@register_learner("maml", summary="MAML (+ Meta-SGD, ANIL by options) on any backbone")
class MAML(Learner):
    """Model-Agnostic Meta-Learning (Finn et al., ICML 2017) on ``backbone`` + linear head.

    Args:
        backbone: images ``(B, C, H, W)`` → features ``(B, backbone.out_features)``.
        way: number of classes per episode (the head's outputs).
        inner_steps: SGD steps on the support set during meta-training (``self.training``).
        inner_steps_eval: inner steps at evaluation (``not self.training``).
        inner_lr: inner learning rate (the initial value of every learned rate with Meta-SGD).
        first_order: drop the second-order term (FOMAML): inner gradients are constants.
        meta_sgd: learn one inner learning rate per adapted parameter element (Meta-SGD).
        adapt / frozen: fnmatch patterns over parameter names (``backbone.*``, ``head.*``)
            choosing what the inner loop adapts: matching any ``adapt`` and no ``frozen``
            pattern. ANIL is ``adapt=["head.*"]``. Frozen parameters are still meta-learned.
        bn: BatchNorm policy. ``"transductive"`` (default): batch statistics for support and
            query, in training and evaluation; running buffers are never read nor written;
            scale γ and offset β are ordinary parameters (adapted unless ``frozen``).
            ``"running"``: in training, batch statistics, and only the outer loop's query pass
            updates the running averages (inner-loop passes leave them alone); in evaluation,
            running statistics for support and query. ``"transductive_outer_beta"`` (the
            cbfinn/maml reference, ``tf.contrib.layers.batch_norm`` with its defaults outside
            the fast weights): batch statistics always, no scale γ (removed from every
            BatchNorm), the offset β learned by the outer loop only (never adapted).
        inner_loss_reduction / query_loss_reduction: reduction of the support / query
            cross-entropy over examples, one of :data:`LOSS_REDUCTIONS`; ``"sum_over_shots"``
            is the reference's ΣCE/K (K = support examples per class).
        head_init: initialisation of the linear head, one of :data:`HEAD_INITS`.
        checkpoint_inner: recompute each inner step in the backward pass
            (``torch.utils.checkpoint``) instead of keeping its graph: memory of second-order
            MAML no longer grows with the activations of every step, at ~1 extra inner step of
            compute each.
        similarity_penalty: weight of ``fewshot_nsl.nn.similarity_penalty(model)`` (sum over
            NSL layers of ‖M − I‖²) added to :meth:`meta_loss`; 0 disables it.
        profile_memory: record :class:`StepMemory` after each inner step in
            ``self.memory_profile`` (see :mod:`fewshot_nsl.profiling`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        way: int,
        *,
        inner_steps: int = 5,
        inner_steps_eval: int = 10,
        inner_lr: float = 0.01,
        first_order: bool = False,
        meta_sgd: bool = False,
        adapt: Sequence[str] = ("*",),
        frozen: Sequence[str] = ("*.M", "*.predictor.*"),
        bn: str = "transductive",
        inner_loss_reduction: str = "mean",
        query_loss_reduction: str = "mean",
        head_init: str = "default",
        checkpoint_inner: bool = False,
        similarity_penalty: float = 0.0,
        profile_memory: bool = False,
    ) -> None:
        super().__init__()
        check_common_options(way, similarity_penalty)
        for key, value in (("inner_steps", inner_steps), ("inner_steps_eval", inner_steps_eval)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be an int >= 0, got {value!r}")
        if not isinstance(inner_lr, (int, float)) or inner_lr <= 0:
            raise ValueError(f"inner_lr must be a positive number, got {inner_lr!r}")
        if bn not in BN_POLICIES:
            raise ValueError(f"bn must be one of {BN_POLICIES}, got {bn!r}")
        for key, value in (
            ("inner_loss_reduction", inner_loss_reduction),
            ("query_loss_reduction", query_loss_reduction),
        ):
            if value not in LOSS_REDUCTIONS:
                raise ValueError(f"{key} must be one of {LOSS_REDUCTIONS}, got {value!r}")
        for key, patterns in (("adapt", adapt), ("frozen", frozen)):
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"{key} must be a list of fnmatch patterns, got {patterns!r}")
        self.way = way
        self.inner_steps = inner_steps
        self.inner_steps_eval = inner_steps_eval
        self.inner_lr = float(inner_lr)
        self.first_order = bool(first_order)
        self.meta_sgd = bool(meta_sgd)
        self.adapt_patterns = tuple(adapt)
        self.frozen_patterns = tuple(frozen)
        self.bn = bn
        self.inner_loss_reduction = inner_loss_reduction
        self.query_loss_reduction = query_loss_reduction
        self.head_init = head_init
        self.checkpoint_inner = bool(checkpoint_inner)
        self.similarity_penalty = float(similarity_penalty)
        self.profile_memory = bool(profile_memory)
        self.memory_profile: list[StepMemory] = []
        self.model = Classifier(backbone, way, head_init)
        outer_only = remove_batchnorm_scale(self.model) if bn == "transductive_outer_beta" else []
        names = [name for name, _ in self.model.named_parameters()]
        self.adapted_names = [
            name
            for name in select_parameters(names, self.adapt_patterns, self.frozen_patterns)
            if name not in outer_only
        ]
        if not self.adapted_names:
            raise ValueError(f"bn={bn!r} leaves no parameter to adapt with adapt={list(adapt)}")
        # Meta-SGD: one learned rate per element of every adapted parameter. Keys cannot hold
        # dots, so they are the parameter names with "." → "-".
        self.inner_lrs = nn.ParameterDict()
        if self.meta_sgd:
            parameters = dict(self.model.named_parameters())
            for name in self.adapted_names:
                self.inner_lrs[name.replace(".", "-")] = nn.Parameter(
                    torch.full_like(parameters[name], self.inner_lr)
                )

    # -- forward passes --------------------------------------------------------------------

    def _forward(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, update_stats: bool
    ) -> torch.Tensor:
        """Logits of the classifier with ``params``, under the BatchNorm policy.

        BatchNorm uses batch statistics unless the policy is "running" in evaluation; its
        running buffers are updated only when ``update_stats`` (the outer-loop query pass of
        the "running" policy); otherwise the pass sees throw-away copies of the buffers.
        """
        batch_statistics = self.bn != "running" or self.training
        buffers = dict(self.model.named_buffers())
        if batch_statistics and not update_stats:
            buffers = {name: buffer.clone() for name, buffer in buffers.items()}
        with batchnorm_mode(self.model, batch_statistics):
            return functional_call(self.model, (params, buffers), (x,))

    def _inner_step(
        self,
        base: dict[str, torch.Tensor],
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        shots: int,
        create_graph: bool,
        *fast: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """One SGD step on the support loss: the new fast weights (order of ``adapted_names``).

        ``base`` holds every parameter; the adapted ones are replaced by ``fast``; ``shots``
        is the divisor of the ``sum_over_shots`` reduction.
        """
        params = dict(base)
        params.update(zip(self.adapted_names, fast))
        logits = self._forward(params, support_x, update_stats=False)
        loss = classification_loss(logits, support_y, self.inner_loss_reduction, shots)
        grads = torch.autograd.grad(loss, fast, create_graph=create_graph, allow_unused=True)
        updated = []
        for name, weight, grad in zip(self.adapted_names, fast, grads):
            if grad is None:  # the support loss does not depend on it (e.g. an unused branch)
                updated.append(weight)
                continue
            rate = self.inner_lrs[name.replace(".", "-")] if self.meta_sgd else self.inner_lr
            updated.append(weight - rate * grad)
        return tuple(updated)

    # -- the Learner protocol ------------------------------------------------------------------

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int) -> MAMLState:
        """Fast weights after ``inner_steps`` (training) or ``inner_steps_eval`` SGD steps.

        Works under ``torch.no_grad()`` (evaluation): the inner gradients are computed under
        ``torch.enable_grad()`` and the fast weights detached after every step, so no graph
        back to the meta-parameters is built. Support shapes: ``(N*K, C, H, W)``, ``(N*K,)``.
        """
        shots = self._check_task(support_x, support_y, way)
        steps = self.inner_steps if self.training else self.inner_steps_eval
        meta_graph = torch.is_grad_enabled()
        create_graph = meta_graph and self.training and not self.first_order
        params = dict(self.model.named_parameters())
        meter = self._memory_meter(params)
        if not meta_graph:  # evaluation: nothing may record a graph to the meta-parameters
            params = {name: p.detach() for name, p in params.items()}
        fast: tuple[torch.Tensor, ...] = tuple(params[name] for name in self.adapted_names)
        with torch.enable_grad(), meter or contextlib.nullcontext():
            if meter is not None:
                self.memory_profile = [meter.record(0)]
            for step in range(1, steps + 1):
                if not meta_graph:
                    fast = tuple(w.detach().requires_grad_() for w in fast)
                if self.checkpoint_inner and meta_graph:
                    fast = checkpoint(
                        self._inner_step,
                        params,
                        support_x,
                        support_y,
                        shots,
                        create_graph,
                        *fast,
                        use_reentrant=False,
                    )
                else:
                    fast = self._inner_step(
                        params, support_x, support_y, shots, create_graph, *fast
                    )
                if meter is not None:
                    self.memory_profile.append(meter.record(step))
        if not meta_graph:
            fast = tuple(w.detach() for w in fast)
        params.update(zip(self.adapted_names, fast))
        return MAMLState(params=params)

    def predict(self, state: MAMLState, query_x: torch.Tensor) -> torch.Tensor:
        """Query logits ``(N*Q, way)`` under the adapted fast weights."""
        update_stats = self.bn == "running" and self.training
        return self._forward(state.params, query_x, update_stats=update_stats)

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query cross-entropy after adaptation, reduced by ``query_loss_reduction``
        (+ ``similarity_penalty`` · Σ‖M − I‖²), and query accuracy."""
        state = self.adapt(episode.support_x, episode.support_y, episode.way)
        logits = self.predict(state, episode.query_x)
        shots = episode.support_y.shape[0] // episode.way
        loss = classification_loss(logits, episode.query_y, self.query_loss_reduction, shots)
        accuracy = (logits.argmax(dim=-1) == episode.query_y).float().mean()
        penalty = similarity_penalty_term(self.model, self.similarity_penalty)
        return loss + penalty, accuracy.detach()

    def meta_loss_batch(
        self, episodes: Sequence[Episode]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mean :meth:`meta_loss` and accuracy over a meta-batch of ``episodes``, the tasks
        run together with ``torch.func.vmap`` (same values and gradients as the sequential
        loop to rounding); ``None``, with one warning, where vmap cannot apply. See
        :mod:`fewshot_nsl.learners.vectorised`."""
        from fewshot_nsl.learners.vectorised import meta_loss_batch

        return meta_loss_batch(self, episodes)

    # -- helpers -------------------------------------------------------------------------------

    def _check_task(self, support_x: torch.Tensor, support_y: torch.Tensor, way: int) -> int:
        """Raise on a malformed task; return its shots K (support examples per class)."""
        if way != self.way:
            raise ValueError(
                f"episode way={way} but this learner's head was built for way={self.way}"
            )
        if support_x.shape[0] != support_y.shape[0]:
            raise ValueError(
                f"support_x has {support_x.shape[0]} images but support_y "
                f"{support_y.shape[0]} labels"
            )
        uses_shots = "sum_over_shots" in (self.inner_loss_reduction, self.query_loss_reduction)
        if uses_shots and support_y.shape[0] % way:
            raise ValueError(
                f"loss reduction 'sum_over_shots' needs K support examples per "
                f"class; got {support_y.shape[0]} for way={way}"
            )
        return support_y.shape[0] // way

    def _memory_meter(self, params: dict[str, torch.Tensor]) -> SavedTensorMeter | None:
        if not self.profile_memory:
            return None
        device = next(iter(params.values())).device
        return SavedTensorMeter(exclude=params.values(), device=device)

    def extra_repr(self) -> str:
        return (
            f"way={self.way}, inner_steps={self.inner_steps}, "
            f"inner_steps_eval={self.inner_steps_eval}, inner_lr={self.inner_lr}, "
            f"first_order={self.first_order}, meta_sgd={self.meta_sgd}, bn={self.bn!r}, "
            f"inner_loss_reduction={self.inner_loss_reduction!r}, "
            f"query_loss_reduction={self.query_loss_reduction!r}, head_init={self.head_init!r}, "
            f"adapt={list(self.adapt_patterns)}, frozen={list(self.frozen_patterns)}, "
            f"checkpoint_inner={self.checkpoint_inner}, "
            f"similarity_penalty={self.similarity_penalty}"
        )


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str, shots: int
) -> torch.Tensor:
    """Cross-entropy of ``logits`` ``(B, way)`` against ``labels`` ``(B,)`` reduced over the
    examples by ``reduction`` (:data:`LOSS_REDUCTIONS`): the mean, or the sum divided by
    ``shots`` (cbfinn/maml's ΣCE/K)."""
    if reduction == "mean":
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="sum") / shots


def remove_batchnorm_scale(model: nn.Module) -> list[str]:
    """Drop the scale γ of every BatchNorm in ``model`` (its ``weight`` becomes None, i.e. 1)
    and return the names of their offsets β (``bias``), which stay outer-loop parameters."""
    offsets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            module.weight = None
            offsets.append(f"{name}.bias")
    return offsets
