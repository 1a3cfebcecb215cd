"""The reference implementations' formulas, re-derived by hand in float64, against the toolkit.

* jakesnell/prototypical-networks (Snell et al. 2017): ``Protonet.loss`` passes support and
  query through the encoder as one batch (``torch.cat``), so in training BatchNorm's batch
  statistics are over both.
* cbfinn/maml (Finn et al. 2017): the inner loss ``utils.xent`` is the per-example softmax
  cross-entropy divided by ``update_batch_size`` (K) and differentiated as a sum
  (``tf.gradients``), i.e. ΣCE/K; the outer loss is ``tf.reduce_sum`` of the same over the
  queries, averaged over tasks. BatchNorm is ``tf.contrib.layers.batch_norm`` with its
  defaults (offset β, no scale γ, batch statistics, epsilon 1e-3) outside the fast weights.
  Initialisation: ``xavier_initializer_conv2d`` for the kernels, zero biases; head
  ``xavier_initializer`` (Mini-ImageNet) or ``tf.random_normal`` (Omniglot). The Omniglot
  network uses stride-2 convolutions with ``SAME`` padding and a spatial mean.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.backbones import build_backbone
from fewshot_nsl.backbones.conv4 import SamePad2d
from fewshot_nsl.fewshot_config import load_fewshot_config as load_config
from fewshot_nsl.learners import MAML, ProtoNet
from tests.test_learners import Flatten, make_episode

WAY, SHOT, QUERY = 3, 2, 2


def reference_inner_step(weight, bias, x, y, lr, shots):
    """One SGD step of softmax regression on Σ_i CE_i / K, the gradient written out:
    ∂/∂W = (softmax − onehot)ᵀ x / K, ∂/∂b = Σ_i (softmax − onehot)_i / K."""
    residual = torch.softmax(x @ weight.T + bias, dim=1) - F.one_hot(y, weight.shape[0])
    return weight - lr * residual.T @ x / shots, bias - lr * residual.sum(0) / shots


def test_inner_step_sum_over_shots_equals_reference_step() -> None:
    torch.manual_seed(0)
    episode = make_episode(way=WAY, shot=SHOT, query=QUERY, dtype=torch.float64)
    learner = MAML(
        Flatten(4), WAY, inner_steps=1, inner_lr=0.01, inner_loss_reduction="sum_over_shots"
    ).double()
    state = learner.adapt(episode.support_x, episode.support_y, WAY)
    head = learner.model.head
    weight, bias = reference_inner_step(
        head.weight.detach(),
        head.bias.detach(),
        episode.support_x.flatten(1),
        episode.support_y,
        lr=0.01,
        shots=SHOT,
    )
    torch.testing.assert_close(state.params["head.weight"], weight, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(state.params["head.bias"], bias, rtol=1e-13, atol=1e-15)
    # the default "mean" step is N× smaller (mean over N·K, not sum over K)
    mean_state = MAML(Flatten(4), WAY, inner_steps=1, inner_lr=0.01).double()
    mean_state.load_state_dict(learner.state_dict())
    adapted = mean_state.adapt(episode.support_x, episode.support_y, WAY)
    step_sum = state.params["head.weight"] - head.weight
    step_mean = adapted.params["head.weight"] - head.weight
    torch.testing.assert_close(step_sum, WAY * step_mean, rtol=1e-12, atol=1e-15)


def test_query_loss_sum_over_shots_equals_reference() -> None:
    torch.manual_seed(0)
    episode = make_episode(way=WAY, shot=SHOT, query=QUERY, dtype=torch.float64)
    learner = MAML(
        Flatten(4),
        WAY,
        inner_steps=1,
        inner_lr=0.01,
        inner_loss_reduction="sum_over_shots",
        query_loss_reduction="sum_over_shots",
    ).double()
    loss, _ = learner.meta_loss(episode)
    head = learner.model.head
    weight, bias = reference_inner_step(
        head.weight.detach(),
        head.bias.detach(),
        episode.support_x.flatten(1),
        episode.support_y,
        lr=0.01,
        shots=SHOT,
    )
    logits = episode.query_x.flatten(1) @ weight.T + bias
    per_example = -torch.log_softmax(logits, dim=1)[torch.arange(len(logits)), episode.query_y]
    torch.testing.assert_close(loss.detach(), per_example.sum() / SHOT, rtol=1e-13, atol=0)


def outer_beta_learner() -> MAML:
    backbone = build_backbone("conv4", in_channels=3, filters=4, image_size=16, norm_eps=1e-3)
    return MAML(backbone, WAY, inner_steps=2, inner_lr=0.1, bn="transductive_outer_beta").double()


def test_batchnorm_outer_beta_has_no_scale_and_adapts_no_offset() -> None:
    torch.manual_seed(0)
    learner = outer_beta_learner()
    episode = make_episode(shape=(3, 16, 16), dtype=torch.float64)
    parameters = dict(learner.model.named_parameters())
    offsets = [n for n in parameters if ".norm." in n]
    assert offsets == [f"backbone.blocks.{i}.norm.bias" for i in range(4)]  # no γ (weight)
    assert not set(offsets) & set(learner.adapted_names)
    assert "backbone.blocks.0.conv.weight" in learner.adapted_names
    state = learner.adapt(episode.support_x, episode.support_y, WAY)
    for name in offsets:
        assert state.params[name] is parameters[name]  # the inner loop leaves β alone
    before = {name: parameters[name].detach().clone() for name in offsets}
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    learner.meta_loss(episode)[0].backward()
    optimizer.step()
    for name in offsets:
        assert parameters[name].grad.abs().sum() > 0
        assert not torch.equal(parameters[name].detach(), before[name])  # the outer step does


def reference_conv4_forward(learner: MAML, x: torch.Tensor) -> torch.Tensor:
    """cbfinn/maml ``forward_conv`` with ``--max_pool``: conv (SAME) + b, batch_norm with the
    batch's statistics, offset β and no scale, ReLU, 2×2 max-pool; flatten; linear head."""
    params = dict(learner.model.named_parameters())
    hidden = x
    for i in range(4):
        prefix = f"backbone.blocks.{i}"
        out = F.conv2d(
            hidden, params[f"{prefix}.conv.weight"], params[f"{prefix}.conv.bias"], padding=1
        )
        mean = out.mean(dim=(0, 2, 3), keepdim=True)
        var = out.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        beta = params[f"{prefix}.norm.bias"].view(1, -1, 1, 1)
        out = (out - mean) / torch.sqrt(var + 1e-3) + beta
        hidden = F.max_pool2d(torch.relu(out), 2)
    return hidden.flatten(1) @ params["head.weight"].T + params["head.bias"]


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_outer_beta_forward_equals_reference(training: bool) -> None:
    torch.manual_seed(0)
    learner = outer_beta_learner()
    with torch.no_grad():
        for name, parameter in learner.model.named_parameters():
            if name.endswith("norm.bias"):
                parameter.normal_()  # a non-zero β, so its place in the formula is checked
    learner.train(training)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    buffers = {n: b.clone() for n, b in learner.model.named_buffers()}
    logits = learner._forward(dict(learner.model.named_parameters()), x, update_stats=False)
    torch.testing.assert_close(logits, reference_conv4_forward(learner, x), rtol=1e-10, atol=1e-12)
    for name, buffer in learner.model.named_buffers():  # batch statistics: buffers unused
        assert torch.equal(buffer, buffers[name])


def test_xavier_uniform_kernels_and_heads() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(
        "conv4", in_channels=1, filters=64, pool="avg", downsample="stride", init="xavier_uniform"
    )
    for i, block in enumerate(backbone.blocks):
        weight = block.conv.weight
        fan_in, fan_out = weight.shape[1] * 9, weight.shape[0] * 9
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert weight.abs().max() <= bound and torch.equal(block.conv.bias, torch.zeros(64))
        # uniform on [−bound, bound]: variance bound²/3 (64·64·9 draws after the first block)
        if i > 0:
            assert abs(weight.var().item() / (bound**2 / 3) - 1) < 0.05
    normal = MAML(backbone, 5, head_init="normal").model.head
    assert abs(normal.weight.std().item() - 1.0) < 0.15 and not normal.bias.any()
    xavier = MAML(Flatten(800), 5, head_init="xavier_uniform").model.head
    bound = math.sqrt(6.0 / (800 + 5))
    assert xavier.weight.abs().max() <= bound and xavier.weight.abs().max() > 0.9 * bound
    assert abs(xavier.weight.var().item() / (bound**2 / 3) - 1) < 0.1 and not xavier.bias.any()


def test_omniglot_network_shapes_and_same_padding() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(
        "conv4", in_channels=1, filters=64, pool="avg", downsample="stride"
    ).double()
    assert backbone.out_features == 64
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    sides = []
    hidden = x
    for block in backbone.blocks:
        assert block.conv.stride == (2, 2) and isinstance(block.pool, nn.Identity)
        hidden = block(hidden)
        sides.append(hidden.shape[-1])
    assert sides == [14, 7, 4, 2]  # TensorFlow SAME: ceil(side / 2)
    torch.testing.assert_close(backbone(x), hidden.mean(dim=(2, 3)))
    # TensorFlow's SAME padding puts the odd extra row/column after: 28 → (0, 1), 7 → (1, 1)
    assert SamePad2d(3, 2)._pads(28) == (0, 1) and SamePad2d(3, 2)._pads(7) == (1, 1)
    conv = backbone.blocks[0].conv
    by_hand = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(conv(backbone.blocks[0].pad(x)), by_hand)


def test_protonet_embed_together_is_one_batch() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("conv4", in_channels=3, filters=4, image_size=16).double()
    learner = ProtoNet(backbone, WAY, embed_together=True).train()
    episode = make_episode(shape=(3, 16, 16), dtype=torch.float64)
    loss, _ = learner.meta_loss(episode)
    # by hand: one forward pass of the concatenated batch, prototypes from its support rows
    features = backbone(torch.cat([episode.support_x, episode.query_x]))
    support, query = features[: len(episode.support_y)], features[len(episode.support_y) :]
    prototypes = torch.stack([support[episode.support_y == n].mean(0) for n in range(WAY)])
    logits = -((query[:, None, :] - prototypes[None]) ** 2).sum(-1)
    torch.testing.assert_close(loss, F.cross_entropy(logits, episode.query_y), rtol=1e-10, atol=0)
    separate, _ = ProtoNet(backbone, WAY).train().meta_loss(episode)
    assert abs(separate.item() - loss.item()) > 1e-6  # BatchNorm batches differ


# -- every few-shot config says what it reproduces -----------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FEW_SHOT = sorted(
    p for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("cifar", "supervised_"))
)


@pytest.mark.parametrize("path", FEW_SHOT, ids=lambda p: p.stem)
def test_every_few_shot_config_has_a_reference_block(path: Path) -> None:
    reference = load_config(path)["reference"]
    assert set(reference) == {"paper", "code", "reproduces", "published", "protocol", "deviations"}
    assert isinstance(reference["deviations"], list)
    assert "test_query_per_class" in reference["protocol"]


@pytest.mark.parametrize(
    "path", sorted(CONFIGS.glob("maml_*_reference.yaml")), ids=lambda p: p.stem
)
def test_maml_reproduction_configs_use_the_reference_settings(path: Path) -> None:
    config = load_config(path)
    learner, episodes = config["learner"], config["episodes"]
    assert learner["inner_loss_reduction"] == learner["query_loss_reduction"] == "sum_over_shots"
    assert learner["bn"] == "transductive_outer_beta" and learner["inner_steps_eval"] == 10
    assert episodes["test_query"] == episodes["shot"] and episodes["test_episodes"] == 600
    options = config["model"]["backbone_options"]
    assert options["init"] == "xavier_uniform" and options["norm_eps"] == 1e-3
    if "omniglot" in path.stem:
        assert (options["downsample"], options["pool"], learner["head_init"]) == (
            "stride",
            "avg",
            "normal",
        )
        assert (learner["inner_lr"], learner["inner_steps"], episodes["query"]) == (
            0.4,
            1,
            episodes["shot"],
        )
    else:
        assert learner["head_init"] == "xavier_uniform" and episodes["query"] == 15
    assert config["reference"]["protocol"]["test_query_per_class"] == episodes["shot"]
    # pixels as the reference feeds them; its last weights tested; its meta-gradient clipping
    omniglot = "omniglot" in path.stem
    assert config["data"]["options"]["normalize"] == ("unit_inverted" if omniglot else "unit")
    assert episodes["val_episodes"] == 0  # no model selection: the final weights are tested
    clip = (None, "norm") if omniglot else (10.0, "value")  # tf.clip_by_value: Mini-ImageNet
    assert (config["train"]["grad_clip"], config["train"]["grad_clip_mode"]) == clip


@pytest.mark.parametrize(
    "path", sorted(CONFIGS.glob("protonet_*_reference.yaml")), ids=lambda p: p.stem
)
def test_protonet_reproduction_configs_use_the_reference_protocol(path: Path) -> None:
    """run_train.py: train N-way, validate/test 5-way with 15 queries per class, an epoch of
    100 episodes, Adam 1e-3 halved every 20 epochs, best = lowest validation loss, stop when
    wait > 200 epochs; run_eval.py: 1000 test episodes (Omniglot)."""
    from fewshot_nsl.engine import LRFactor

    config = load_config(path)
    episodes, train = config["episodes"], config["train"]
    way = {"miniimagenet_1shot": 30, "miniimagenet_5shot": 20}.get(
        path.stem.split("_", 2)[2][:-10], 60
    )
    assert (episodes["way"], episodes["test_way"], episodes["test_query"]) == (way, 5, 15)
    assert (episodes["val_episodes"], episodes["val_query"], train["val_every"]) == (100, 15, 100)
    assert (train["select_by"], train["patience"], train["lr"]) == ("val_loss", 200, 1e-3)
    assert config["learner"] == {
        "name": "protonet",
        "embed_together": True,
        "similarity_penalty": 0.0,
    }
    factor = LRFactor(
        train["lr_schedule"], train["steps"], train["lr_milestones"], train["lr_gamma"]
    )
    for epoch in (0, 19, 20, 39, 40, 999):
        assert factor(100 * epoch) == 0.5 ** (epoch // 20)
    assert config["reference"]["protocol"]["test_way"] == 5
    assert config["reference"]["protocol"]["test_tasks"] == episodes["test_episodes"]
    assert "omniglot" not in path.stem or episodes["test_episodes"] == 1000
    assert not any("BLOCKING" in line for line in config["reference"]["deviations"])
