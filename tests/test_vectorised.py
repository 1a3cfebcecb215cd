"""The vectorised meta-batch (vmap over tasks) against the sequential loop, its reference."""

from __future__ import annotations

import warnings

import pytest
import torch

from fewshot_nsl.learners import MAML
from fewshot_nsl.learners.vectorised import _WARNED, sequential_meta_loss, vectorised_meta_loss
from tests.test_learners import WAY, image_episode, one_thread, tiny_conv4  # noqa: F401

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


def loss_and_grads(learner: MAML, episodes, vectorise: bool):
    learner.zero_grad()
    meta_loss = vectorised_meta_loss if vectorise else sequential_meta_loss
    loss, accuracy = meta_loss(learner, episodes)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    return loss.detach(), accuracy, grads


CASES = [
    (variant, dtype, tolerance)
    for variant in sorted(VARIANTS)
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5))
]


@pytest.mark.parametrize("variant, dtype, tolerance", CASES)
def test_vectorised_equals_sequential(variant: str, dtype: torch.dtype, tolerance: float) -> None:
    kind, conv, options = VARIANTS[variant]
    torch.manual_seed(0)
    learner = MAML(tiny_conv4(kind, **conv), WAY, inner_steps=2, inner_lr=0.1, **options)
    learner = learner.to(dtype).train()
    episodes = [image_episode(seed, dtype=dtype) for seed in range(2)]
    sequential = loss_and_grads(learner, episodes, vectorise=False)
    vectorised = loss_and_grads(learner, episodes, vectorise=True)
    torch.testing.assert_close(vectorised[0], sequential[0], rtol=tolerance, atol=0)
    torch.testing.assert_close(vectorised[1], sequential[1])
    assert vectorised[2].keys() == sequential[2].keys() and sequential[2]
    # relative to the largest gradient: a conv bias before BatchNorm has a gradient of zero
    # up to rounding (~1e-16), which no relative tolerance of its own can compare
    scale = max(g.abs().max() for g in sequential[2].values())
    for name, expected in sequential[2].items():
        assert (vectorised[2][name] - expected).abs().max() / scale <= tolerance, name


def test_falls_back_with_one_warning_where_vmap_cannot_apply() -> None:
    torch.manual_seed(0)
    learner = MAML(tiny_conv4(), WAY, inner_steps=1, bn="running").train()
    episodes = [image_episode(seed) for seed in range(2)]
    _WARNED.clear()
    with pytest.warns(UserWarning, match="running the tasks sequentially.*running"):
        fallback, _ = learner.meta_loss_batch(episodes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason warns once
        learner.meta_loss_batch(episodes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a vectorisable learner takes the vmap path, silently
        MAML(tiny_conv4(), WAY, inner_steps=1).train().meta_loss_batch(episodes)
    torch.manual_seed(0)
    reference = MAML(tiny_conv4(), WAY, inner_steps=1, bn="running").train()
    expected = torch.stack([reference.meta_loss(e)[0] for e in episodes]).mean()
    torch.testing.assert_close(fallback, expected)
