"""The vectorised meta-batch against the sequential loop, its reference: one meta-gradient and
several training steps, per learner variant and per vectorised form (vmap over tasks, and
for a plain Conv-4 the tasks folded into grouped convolutions), and the training loop's
``train.meta_batch`` switch."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

from fewshot_nsl.backbones import build_backbone
from fewshot_nsl.fewshot_config import resolve_fewshot_config
from fewshot_nsl.learners import MAML, vectorised
from fewshot_nsl.learners.base import SEQUENTIAL_REASONS_WARNED
from fewshot_nsl.learners.vectorised import (
    GroupedConv2d,
    sequential_meta_loss,
    task_folded_meta_loss,
    task_folded_supported,
    vectorised_meta_loss,
    vmap_meta_loss,
)
from fewshot_nsl.runner import MetaTrainer
from tests.test_learners import WAY, image_episode, one_thread, tiny_conv4  # noqa: F401
from tests.test_runner import tiny_config

VARIANTS = {
    "maml": ("plain", {}, {}),
    "fomaml": ("plain", {}, {"first_order": True}),
    "meta_sgd": ("plain", {}, {"meta_sgd": True}),
    "anil": ("plain", {}, {"adapt": ["head.*"]}),
    "static_nsn": ("static", {}, {"similarity_penalty": 5e-3}),
    "dynamic_nsn_sample": ("dynamic", {"granularity": "sample"}, {}),
    "dynamic_nsn_location": ("dynamic", {"granularity": "location"}, {}),
    "reference_bn_sum_over_shots": (
        "plain",
        {},
        {
            "bn": "transductive_outer_beta",
            "inner_loss_reduction": "sum_over_shots",
            "query_loss_reduction": "sum_over_shots",
        },
    ),
}


def folded_one_task_per_chunk(learner: MAML, episodes):
    """The folded form with chunks of one task (a chunk budget of 1 byte)."""
    with mock.patch.object(vectorised, "FOLDED_CHUNK_BYTES", 1):
        assert vectorised.folded_chunk(learner.model, episodes[0]) == 1
        return task_folded_meta_loss(learner, episodes)


#: The vectorised forms by name; ``None`` is the sequential loop.
FORMS = {
    "vmap": vmap_meta_loss,
    "folded": task_folded_meta_loss,
    "folded_chunks": folded_one_task_per_chunk,
    None: None,
}


def loss_and_grads(learner: MAML, episodes, form: str | None):
    """Meta-loss, accuracy and meta-gradients of one meta-batch by vectorised ``form``; the
    sequential side (``None``) as the training loop runs it (one backward per task, each loss
    divided by the task count)."""
    learner.zero_grad()
    if form is not None:
        loss, accuracy = FORMS[form](learner, episodes)
        loss.backward()
    else:
        losses, accuracies = [], []
        for episode in episodes:
            task_loss, task_accuracy = learner.meta_loss(episode)
            (task_loss / len(episodes)).backward()
            losses.append(task_loss.detach())
            accuracies.append(task_accuracy)
        loss, accuracy = torch.stack(losses).mean(), torch.stack(accuracies).mean()
    grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    return loss.detach(), accuracy, grads


def assert_close_to_largest(actual: dict, expected: dict, tolerance: float) -> None:
    """Every tensor of ``actual`` equals ``expected``'s within ``tolerance`` relative to the
    largest entry of ``expected``: a conv bias before BatchNorm has a gradient of zero up to
    rounding (~1e-16), which no relative tolerance of its own can compare."""
    assert actual.keys() == expected.keys() and expected
    scale = max(value.abs().max() for value in expected.values())
    assert scale > 0
    for name, value in expected.items():
        assert (actual[name] - value).abs().max() / scale <= tolerance, name


CASES = [
    (variant, form, dtype, tolerance)
    for variant in sorted(VARIANTS)
    for form in (
        ("vmap", "folded", "folded_chunks") if VARIANTS[variant][0] == "plain" else ("vmap",)
    )
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5))
]
OUTER_STEPS = 3
OUTER_LR = 0.05


@pytest.mark.parametrize("variant, form, dtype, tolerance", CASES)
def test_vectorised_training_equals_sequential(
    variant: str, form: str, dtype: torch.dtype, tolerance: float
) -> None:
    """OUTER_STEPS outer SGD steps, each on a fresh meta-batch: the same losses, accuracies
    and meta-gradients at every step, and the same weight updates at the end. In float32 the
    meta-gradients are compared at the first step only: from the second on they are taken at
    weights already ~1e-7 apart, which a second-order meta-gradient amplifies past 1e-5 of
    its own scale (measured: 1.6e-5 at the third step); the weight updates, the sum of the
    three steps, are compared within OUTER_STEPS times the tolerance in float32 (measured: up
    to 1.3e-5 of the largest update, vmap form, where a change of the order in which autograd
    accumulates equal contributions moved the rounding; 1e-10 holds in float64)."""
    kind, conv, options = VARIANTS[variant]
    torch.manual_seed(0)
    sequential = MAML(tiny_conv4(kind, **conv), WAY, inner_steps=2, inner_lr=0.1, **options)
    sequential = sequential.to(dtype).train()
    vectorised = copy.deepcopy(sequential)
    initial = {n: p.detach().clone() for n, p in sequential.named_parameters()}
    for step in range(OUTER_STEPS):
        episodes = [image_episode(2 * step + task, dtype=dtype) for task in range(2)]
        expected = loss_and_grads(sequential, episodes, None)
        actual = loss_and_grads(vectorised, episodes, form)
        torch.testing.assert_close(actual[0], expected[0], rtol=tolerance, atol=0)
        torch.testing.assert_close(actual[1], expected[1])
        if dtype == torch.float64 or step == 0:  # float32: see the docstring
            assert_close_to_largest(actual[2], expected[2], tolerance)
        with torch.no_grad():
            for learner in (sequential, vectorised):
                for parameter in learner.parameters():
                    if parameter.grad is not None:
                        parameter -= OUTER_LR * parameter.grad
    updates = {
        name: {n: p.detach() - initial[n] for n, p in learner.named_parameters()}
        for name, learner in (("sequential", sequential), ("vectorised", vectorised))
    }
    update_tolerance = tolerance if dtype == torch.float64 else OUTER_STEPS * tolerance
    assert_close_to_largest(updates["vectorised"], updates["sequential"], update_tolerance)


@pytest.mark.parametrize("downsample", ["max_pool", "stride"])
def test_folded_form_in_evaluation_equals_sequential(downsample: str) -> None:
    """Without a meta-graph (``torch.no_grad``, evaluation: ``inner_steps_eval`` first-order
    steps) the folded form adapts and predicts as the sequential loop, for both Conv-4
    layouts (max-pool; strided with TensorFlow padding and average pooling)."""
    torch.manual_seed(0)
    backbone = build_backbone(
        "conv4", in_channels=3, filters=4, image_size=16, downsample=downsample, pool="avg"
    )
    learner = MAML(backbone, WAY, inner_steps_eval=3, inner_lr=0.1).to(torch.float64).eval()
    assert task_folded_supported(learner.model)
    episodes = [image_episode(seed, dtype=torch.float64) for seed in range(3)]
    with torch.no_grad():
        expected = sequential_meta_loss(learner, episodes)
        actual = task_folded_meta_loss(learner, episodes)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(actual[1], expected[1])


def test_vectorised_meta_loss_folds_a_plain_conv4_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatcher takes the folded form for a plain Conv-4 and vmap for NSL layers."""
    taken = []
    for form in ("vmap_meta_loss", "task_folded_meta_loss"):
        monkeypatch.setattr(vectorised, form, lambda *_, form=form: taken.append(form))
    episodes = [image_episode(seed) for seed in range(2)]
    for kind, conv in (("plain", {}), ("static", {}), ("dynamic", {"granularity": "sample"})):
        vectorised_meta_loss(MAML(tiny_conv4(kind, **conv), WAY).train(), episodes)
    assert taken == ["task_folded_meta_loss", "vmap_meta_loss", "vmap_meta_loss"]


@pytest.mark.parametrize(
    "stride, padding, dilation, side", [(2, 0, 1, 8), (1, 1, 2, 7), (2, 1, 1, 7)]
)
def test_grouped_conv_equals_conv2d_and_has_exact_derivatives(
    stride: int, padding: int, dilation: int, side: int
) -> None:
    """GroupedConv2d (input gradient by a transposed convolution) computes F.conv2d, and its
    first and second derivatives match finite differences: strided with a remainder the
    windows miss (output_padding), padded and dilated; 2 groups."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, side, side, dtype=torch.float64, generator=generator)
    weight = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=generator)
    pair = (stride, stride), (padding, padding), (dilation, dilation)

    def op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return GroupedConv2d.apply(x, weight, *pair, 2)

    expected = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, 2)
    torch.testing.assert_close(op(x, weight), expected, rtol=1e-12, atol=1e-12)
    inputs = (x.requires_grad_(), weight.requires_grad_())
    assert torch.autograd.gradcheck(op, inputs)
    assert torch.autograd.gradgradcheck(op, inputs)


def test_falls_back_with_one_warning_where_vmap_cannot_apply() -> None:
    torch.manual_seed(0)
    learner = MAML(tiny_conv4(), WAY, inner_steps=1, bn="running").train()
    episodes = [image_episode(seed) for seed in range(2)]
    SEQUENTIAL_REASONS_WARNED.clear()
    with pytest.warns(UserWarning, match="running the tasks sequentially.*running"):
        assert learner.meta_loss_batch(episodes) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason warns once
        assert learner.meta_loss_batch(episodes) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a vectorisable learner takes the vmap path, silently
        together = MAML(tiny_conv4(), WAY, inner_steps=1).train().meta_loss_batch(episodes)
    assert together is not None


def trained(
    tmp_path: Path, *overrides: str, learner: str = "maml"
) -> tuple[MetaTrainer, list[float]]:
    """A tiny run of 3 steps without validation; its learner and per-step losses."""
    config = tiny_config("train.steps=3", "train.val_every=0", "train.log_every=1", *overrides)
    if learner != "maml":
        config = resolve_fewshot_config({**config, "learner": {"name": learner}})
    trainer = MetaTrainer(config, tmp_path, quiet=True)
    trainer.setup()
    losses = [trainer.meta_step(step)[0] for step in range(3)]
    return trainer, losses


def test_training_switch_gives_the_sequential_run(tmp_path: Path) -> None:
    """``train.meta_batch=vectorised`` in the training loop (Adam, 2 tasks per batch): the
    same losses and, after 3 steps, the same predictions as the sequential default."""
    sequential, expected = trained(tmp_path / "sequential")
    SEQUENTIAL_REASONS_WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MAML vectorises: no fallback warning
        vectorised, actual = trained(tmp_path / "vectorised", "train.meta_batch=vectorised")
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    episode = sequential.batcher.batch(99)[0]
    episode = sequential.batcher.sampler.to_device(episode, sequential.device)  # uint8 -> float
    # Adam turns a gradient that is zero up to rounding (a conv bias before BatchNorm) into a
    # full step of either sign: compare what the weights compute, which that bias cannot move.
    with torch.no_grad():
        logits = [
            trainer.learner.predict(
                trainer.learner.adapt(episode.support_x, episode.support_y, 3), episode.query_x
            )
            for trainer in (sequential, vectorised)
        ]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_a_learner_without_a_vectorised_form_runs_sequentially(tmp_path: Path) -> None:
    """ProtoNet has no inner loop to vectorise: one warning, then exactly the sequential run."""
    _, expected = trained(tmp_path / "sequential", learner="protonet")
    SEQUENTIAL_REASONS_WARNED.clear()
    with pytest.warns(UserWarning, match="ProtoNet has no vectorised meta-batch"):
        _, actual = trained(
            tmp_path / "vectorised", "train.meta_batch=vectorised", learner="protonet"
        )
    assert actual == expected
