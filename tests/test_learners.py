"""Learners: the MAML inner loop against hand computations, NSN configurations, ProtoNet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from episodes import Episode
from fewshot_nsl.backbones import build_backbone
from fewshot_nsl.learners import (
    MAML,
    ProtoNet,
    build_learner,
    learner_options,
    list_learners,
    select_parameters,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WAY = 3


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster than two that synchronise, and
    keeps the suite quick on a loaded 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Flatten(nn.Module):
    """Parameter-free backbone: features are the flattened pixels."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class TanhLayer(nn.Module):
    """Tiny backbone with parameters: tanh(linear(flattened pixels))."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x.flatten(1)))


def make_episode(
    way: int = WAY,
    shot: int = 2,
    query: int = 2,
    shape: tuple[int, ...] = (1, 2, 2),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Episode:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(way)
    return Episode(
        support_x=torch.randn(way * shot, *shape, generator=generator, dtype=dtype),
        support_y=labels.repeat_interleave(shot),
        query_x=torch.randn(way * query, *shape, generator=generator, dtype=dtype),
        query_y=labels.repeat_interleave(query),
        classes=labels,
        support_indices=torch.arange(way * shot),
        query_indices=torch.arange(way * query),
        way=way,
        shot=shot,
        query=query,
    )


def tiny_conv4(kind: str = "plain", **conv: object) -> nn.Module:
    spec = None if kind == "plain" else {"kind": kind, **conv}
    return build_backbone("conv4", in_channels=3, conv=spec, filters=4, image_size=16)


def image_episode(seed: int = 0, dtype: torch.dtype = torch.float32) -> Episode:
    return make_episode(shape=(3, 16, 16), seed=seed, dtype=dtype)


# -- the inner loop against analytic softmax-regression gradients -----------------------------


def softmax_regression_grads(
    weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """d CE / d(weight, bias) of logits x Wᵀ + b, written out: (softmax − onehot)ᵀ x / n."""
    residual = torch.softmax(x @ weight.T + bias, dim=1) - F.one_hot(y, weight.shape[0])
    return residual.T @ x / len(y), residual.mean(0)


def hand_sgd(weight, bias, x, y, lr, steps):
    for _ in range(steps):
        grad_w, grad_b = softmax_regression_grads(weight, bias, x, y)
        weight, bias = weight - lr * grad_w, bias - lr * grad_b
    return weight, bias


@pytest.mark.parametrize("steps", [1, 3])
def test_inner_steps_equal_hand_written_sgd(steps: int) -> None:
    torch.manual_seed(0)
    learner = MAML(Flatten(4), WAY, inner_steps=steps, inner_lr=0.3).double()
    episode = make_episode(dtype=torch.float64)
    state = learner.adapt(episode.support_x, episode.support_y, WAY)
    head = learner.model.head
    x = episode.support_x.flatten(1)
    weight, bias = hand_sgd(
        head.weight.detach(), head.bias.detach(), x, episode.support_y, 0.3, steps
    )
    torch.testing.assert_close(state.params["head.weight"], weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.params["head.bias"], bias, rtol=1e-12, atol=1e-12)


def finite_difference_grads(learner: nn.Module, episode: Episode, eps: float = 1e-6):
    grads = {}
    with torch.no_grad():
        for name, parameter in learner.named_parameters():
            grad = torch.zeros_like(parameter)
            flat, flat_grad = parameter.view(-1), grad.view(-1)
            for i in range(flat.numel()):
                original = flat[i].item()
                flat[i] = original + eps
                with torch.enable_grad():
                    plus = learner.meta_loss(episode)[0].item()
                flat[i] = original - eps
                with torch.enable_grad():
                    minus = learner.meta_loss(episode)[0].item()
                flat[i] = original
                flat_grad[i] = (plus - minus) / (2 * eps)
            grads[name] = grad
    return grads


def test_second_order_meta_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    learner = MAML(TanhLayer(4, 3), WAY, inner_steps=2, inner_lr=0.5).double()
    episode = make_episode(dtype=torch.float64)
    learner.meta_loss(episode)[0].backward()
    reference = finite_difference_grads(learner, episode)
    for name, parameter in learner.named_parameters():
        torch.testing.assert_close(
            parameter.grad, reference[name], rtol=1e-6, atol=1e-8, msg=f"meta-gradient of {name}"
        )


def test_meta_sgd_meta_gradient_matches_directional_finite_differences() -> None:
    """Meta-SGD doubles the parameters; check the gradient along random directions instead."""
    torch.manual_seed(0)
    learner = MAML(TanhLayer(4, 3), WAY, inner_steps=2, inner_lr=0.5, meta_sgd=True).double()
    episode = make_episode(dtype=torch.float64)
    learner.meta_loss(episode)[0].backward()
    parameters = list(learner.parameters())
    eps = 1e-6
    for _ in range(3):
        direction = [torch.randn_like(p) for p in parameters]
        with torch.no_grad():
            for p, d in zip(parameters, direction):
                p.add_(eps * d)
            plus = learner.meta_loss(episode)[0].item()
            for p, d in zip(parameters, direction):
                p.sub_(2 * eps * d)
            minus = learner.meta_loss(episode)[0].item()
            for p, d in zip(parameters, direction):
                p.add_(eps * d)
        analytic = sum((p.grad * d).sum() for p, d in zip(parameters, direction)).item()
        assert analytic == pytest.approx((plus - minus) / (2 * eps), rel=1e-6, abs=1e-9)


def test_first_order_is_the_gradient_at_the_adapted_weights() -> None:
    torch.manual_seed(0)
    episode = make_episode(dtype=torch.float64)
    first = MAML(Flatten(4), WAY, inner_steps=2, inner_lr=0.5, first_order=True).double()
    second = MAML(Flatten(4), WAY, inner_steps=2, inner_lr=0.5).double()
    second.load_state_dict(first.state_dict())
    head = first.model.head
    weight, bias = hand_sgd(
        head.weight.detach(),
        head.bias.detach(),
        episode.support_x.flatten(1),
        episode.support_y,
        0.5,
        2,
    )
    grad_w, grad_b = softmax_regression_grads(
        weight, bias, episode.query_x.flatten(1), episode.query_y
    )
    first.meta_loss(episode)[0].backward()
    second.meta_loss(episode)[0].backward()
    torch.testing.assert_close(head.weight.grad, grad_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.bias.grad, grad_b, rtol=1e-10, atol=1e-12)
    # the dropped second-order term is not negligible here, so the comparison can fail
    assert (second.model.head.weight.grad - grad_w).abs().max() > 1e-3


# -- parameter selection: static M, dynamic predictor, ANIL, Meta-SGD -------------------------


def test_static_nsn_meta_learns_m_and_adapts_kernels() -> None:
    torch.manual_seed(0)
    learner = MAML(tiny_conv4("static"), WAY, inner_steps=2, inner_lr=0.1)
    episode = image_episode()
    parameters = dict(learner.model.named_parameters())
    m_names = [n for n in parameters if n.endswith(".M")]
    assert len(m_names) == 4 and not set(m_names) & set(learner.adapted_names)
    state = learner.adapt(episode.support_x, episode.support_y, WAY)
    for name in m_names:
        assert state.params[name] is parameters[name]  # untouched by the inner loop
    assert not torch.equal(
        state.params["backbone.blocks.0.conv.weight"], parameters["backbone.blocks.0.conv.weight"]
    )
    learner.meta_loss(episode)[0].backward()
    for name in m_names:
        assert parameters[name].grad is not None and parameters[name].grad.abs().sum() > 0

    adapting_m = MAML(tiny_conv4("static"), WAY, frozen=[], inner_steps=1)
    state = adapting_m.adapt(episode.support_x, episode.support_y, WAY)
    m = dict(adapting_m.model.named_parameters())["backbone.blocks.0.conv.M"]
    assert not torch.equal(state.params["backbone.blocks.0.conv.M"], m)


@pytest.mark.parametrize("granularity", ["sample", "location"])
def test_dynamic_nsn_hypernetwork_is_meta_learned(granularity: str) -> None:
    torch.manual_seed(0)
    learner = MAML(tiny_conv4("dynamic", granularity=granularity), WAY, inner_steps=1)
    episode = image_episode()
    parameters = dict(learner.model.named_parameters())
    predictor = [n for n in parameters if ".predictor." in n]
    assert predictor and not set(predictor) & set(learner.adapted_names)
    state = learner.adapt(episode.support_x, episode.support_y, WAY)
    assert all(state.params[n] is parameters[n] for n in predictor)
    learner.meta_loss(episode)[0].backward()
    for layer in range(4):
        grads = [parameters[n].grad for n in predictor if f"blocks.{layer}." in n]
        assert grads and sum(g.abs().sum() for g in grads if g is not None) > 0, layer


def test_anil_changes_only_the_head() -> None:
    torch.manual_seed(0)
    learner = MAML(tiny_conv4(), WAY, adapt=["head.*"], inner_steps=2)
    assert learner.adapted_names == ["head.weight", "head.bias"]
    episode = image_episode()
    parameters = dict(learner.model.named_parameters())
    state = learner.adapt(episode.support_x, episode.support_y, WAY)
    for name, parameter in parameters.items():
        changed = not torch.equal(state.params[name], parameter)
        assert changed == name.startswith("head."), name


def test_meta_sgd_rates_start_at_inner_lr_and_receive_gradient() -> None:
    torch.manual_seed(0)
    meta_sgd = MAML(tiny_conv4(), WAY, meta_sgd=True, inner_lr=0.05, inner_steps=2)
    plain = MAML(tiny_conv4(), WAY, inner_lr=0.05, inner_steps=2)
    plain.model.load_state_dict(meta_sgd.model.state_dict())
    episode = image_episode()
    loss, _ = meta_sgd.meta_loss(episode)
    torch.testing.assert_close(loss, plain.meta_loss(episode)[0])
    loss.backward()
    assert len(meta_sgd.inner_lrs) == len(meta_sgd.adapted_names)
    for rate in meta_sgd.inner_lrs.values():
        assert rate.grad is not None and rate.grad.abs().sum() > 0


def test_select_parameters_patterns_and_errors() -> None:
    names = ["backbone.a.weight", "backbone.a.M", "backbone.a.predictor.w", "head.weight"]
    assert select_parameters(names, ["*"], ["*.M", "*.predictor.*"]) == [
        "backbone.a.weight",
        "head.weight",
    ]
    with pytest.raises(ValueError, match="'heads.\\*' matches no parameter"):
        select_parameters(names, ["heads.*"], [])
    with pytest.raises(ValueError, match="leaves no parameter"):
        select_parameters(names, ["head.*"], ["head.*"])


# -- BatchNorm policies --------------------------------------------------------------------------


def buffers(learner: MAML) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in learner.model.named_buffers()}


def assert_same_buffers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_transductive_bn_uses_batch_statistics_and_never_touches_buffers() -> None:
    torch.manual_seed(0)
    learner = MAML(tiny_conv4(), WAY, inner_steps=1, inner_steps_eval=0)
    assert learner.bn == "transductive"
    episode = image_episode()
    before = buffers(learner)
    learner.meta_loss(episode)[0].backward()
    learner.eval()
    with torch.no_grad():
        learner.meta_loss(episode)
        state = learner.adapt(episode.support_x, episode.support_y, WAY)
        logits = learner.predict(state, episode.query_x)
        single = learner.predict(state, episode.query_x[:1])
        assert_same_buffers(before, buffers(learner))
        batch_mode = learner.model.train()(episode.query_x)
    torch.testing.assert_close(logits, batch_mode)  # 0 eval steps: the initial weights
    assert not torch.allclose(logits[:1], single)  # depends on the other queries


def test_running_bn_updates_only_in_the_outer_loop_and_is_used_at_evaluation() -> None:
    torch.manual_seed(0)
    learner = MAML(tiny_conv4(), WAY, inner_steps=2, inner_steps_eval=0, bn="running")
    episode = image_episode()
    before = buffers(learner)
    state = learner.adapt(episode.support_x, episode.support_y, WAY)
    assert_same_buffers(before, buffers(learner))  # inner loop: no update
    learner.predict(state, episode.query_x)
    after_query = buffers(learner)
    assert not torch.equal(
        after_query["backbone.blocks.0.norm.running_mean"],
        before["backbone.blocks.0.norm.running_mean"],
    )
    learner.eval()
    with torch.no_grad():
        learner.meta_loss(episode)
        assert_same_buffers(after_query, buffers(learner))
        state = learner.adapt(episode.support_x, episode.support_y, WAY)
        logits = learner.predict(state, episode.query_x)
        single = learner.predict(state, episode.query_x[:1])
        eval_mode = learner.model.eval()(episode.query_x)
    torch.testing.assert_close(logits, eval_mode)
    torch.testing.assert_close(logits[:1], single)


def test_evaluation_under_no_grad_uses_eval_steps_and_builds_no_graph() -> None:
    torch.manual_seed(0)
    learner = MAML(tiny_conv4(), WAY, inner_steps=1, inner_steps_eval=3, profile_memory=True)
    episode = image_episode()
    learner.eval()
    with torch.no_grad():
        state = learner.adapt(episode.support_x, episode.support_y, WAY)
        logits = learner.predict(state, episode.query_x)
    assert len(learner.memory_profile) == 4  # steps 0..3
    assert not logits.requires_grad
    assert not any(p.requires_grad for p in state.params.values())
    learner.train()
    learner.adapt(episode.support_x, episode.support_y, WAY)
    assert len(learner.memory_profile) == 2


def test_checkpointed_inner_loop_same_gradient_less_saved_memory() -> None:
    torch.manual_seed(0)
    episode = image_episode(dtype=torch.float64)
    runs = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        learner = MAML(
            tiny_conv4(), WAY, inner_steps=3, checkpoint_inner=checkpointed, profile_memory=True
        ).double()
        learner.meta_loss(episode)[0].backward()
        runs[checkpointed] = (
            {n: p.grad.clone() for n, p in learner.named_parameters()},
            [m.saved_bytes for m in learner.memory_profile],
        )
    (plain_grads, plain_bytes), (ckpt_grads, ckpt_bytes) = runs[False], runs[True]
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-10, atol=1e-12)
    assert plain_bytes[0] == 0 and all(a < b for a, b in zip(plain_bytes, plain_bytes[1:]))
    assert ckpt_bytes[-1] < plain_bytes[-1] / 2
    assert learner.memory_profile[-1].cuda_peak_bytes is None  # CPU: no allocator counter


@pytest.mark.cuda
def test_cuda_meta_step_and_peak_memory() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    learner = MAML(
        tiny_conv4("dynamic", granularity="sample"), WAY, inner_steps=2, profile_memory=True
    ).cuda()
    loss, _ = learner.meta_loss(image_episode().to("cuda"))
    loss.backward()
    assert all(p.grad is not None for p in learner.parameters())
    peaks = [m.cuda_peak_bytes for m in learner.memory_profile]
    assert all(isinstance(p, int) and p > 0 for p in peaks) and peaks == sorted(peaks)


def test_similarity_penalty_adds_weighted_norm_of_m_minus_identity() -> None:
    torch.manual_seed(0)
    learner = MAML(tiny_conv4("static"), WAY, inner_steps=1, similarity_penalty=0.0)
    episode = image_episode()
    with torch.no_grad():
        for name, parameter in learner.model.named_parameters():
            if name.endswith(".M"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    base = learner.meta_loss(episode)[0]
    learner.similarity_penalty = 0.5
    penalised = learner.meta_loss(episode)[0]
    by_hand = sum(
        ((p - torch.eye(p.shape[-1])) ** 2).sum()
        for n, p in learner.model.named_parameters()
        if n.endswith(".M")
    )
    torch.testing.assert_close(penalised - base, 0.5 * by_hand)


# -- ProtoNet -----------------------------------------------------------------------------------


def test_protonet_logits_equal_hand_computation() -> None:
    torch.manual_seed(0)
    learner = ProtoNet(TanhLayer(4, 5), WAY).double()
    episode = make_episode(shot=3, dtype=torch.float64)
    state = learner.adapt(episode.support_x, episode.support_y, WAY)
    logits = learner.predict(state, episode.query_x)
    embed = learner.backbone
    support = embed(episode.support_x).detach()
    query = embed(episode.query_x).detach()
    expected = torch.empty(len(query), WAY, dtype=torch.float64)
    for n in range(WAY):
        rows = [support[i] for i in range(len(support)) if episode.support_y[i] == n]
        prototype = sum(rows) / len(rows)
        for q in range(len(query)):
            expected[q, n] = -sum((query[q, d] - prototype[d]) ** 2 for d in range(5))
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="every label"):
        learner.adapt(episode.support_x, torch.zeros_like(episode.support_y), WAY)


# -- build_learner and plug-in backbones -------------------------------------------------------


def test_build_learner_names_options_and_defaults() -> None:
    assert list_learners() == ["dynamic_nsn", "maml", "protonet", "static_nsn"]
    model = {"backbone": "conv4", "backbone_options": {"filters": 4, "image_size": 16}}
    maml = build_learner(
        {"name": "maml", "inner_steps": 2, "bn": "running"}, model, in_channels=3, way=5
    )
    assert isinstance(maml, MAML) and maml.inner_steps == 2 and maml.bn == "running"
    dynamic = build_learner({"name": "dynamic_nsn"}, model, in_channels=3, way=5)
    assert type(dynamic) is MAML and dynamic.similarity_penalty == 0.0
    assert type(dynamic.model.backbone.blocks[0].conv).__name__ == "DynamicNSLConv2d"
    static = build_learner({"name": "static_nsn"}, model, in_channels=3, way=5)
    assert type(static) is MAML and static.similarity_penalty == 5e-3
    assert type(static.model.backbone.blocks[0].conv).__name__ == "NSLConv2d"
    # presets: the class's options with the preset's defaults, which an option overrides
    assert learner_options("static_nsn") == {**learner_options("maml"), "similarity_penalty": 5e-3}
    assert learner_options("dynamic_nsn") == learner_options("maml")
    overridden = build_learner(
        {"name": "static_nsn", "similarity_penalty": 0.0}, model, in_channels=3, way=5
    )
    assert overridden.similarity_penalty == 0.0
    assert isinstance(build_learner({"name": "protonet"}, model, in_channels=3, way=5), ProtoNet)


@pytest.mark.parametrize(
    "learner, model, message",
    [
        ({"name": "reptile"}, {}, "unknown learner name 'reptile'; allowed: .*maml"),
        ({"name": "maml", "inner_step": 1}, {}, "unknown option.*'inner_step'.*inner_steps"),
        ({"name": "maml"}, {"head": 1}, "unknown model key.*'head'.*backbone_options"),
        ({"name": "maml", "bn": "batch"}, {}, "bn must be one of"),
        ({"name": "static_nsn"}, {"conv": {"kind": "plain"}}, "needs model.conv.kind='static'"),
        ({"name": "maml"}, {"backbone": "vgg"}, "unknown backbone"),
        ({"name": "maml"}, {"backbone_options": {"in_channels": 1}}, "may not set"),
        ({"name": "maml", "inner_lr": -1}, {}, "inner_lr"),
    ],
)
def test_build_learner_errors(learner: dict, model: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_learner(learner, model, in_channels=3, way=5)


def test_backbone_without_out_features_is_an_error() -> None:
    with pytest.raises(ValueError, match="out_features"):
        MAML(nn.Flatten(), WAY)


def test_wrong_way_is_an_error() -> None:
    learner = MAML(Flatten(4), WAY)
    episode = make_episode(way=4)
    with pytest.raises(ValueError, match="way=4.*way=3"):
        learner.meta_loss(episode)


@pytest.mark.parametrize("name", ["maml", "static_nsn"])
def test_custom_backbone_by_import_path_trains(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    torch.manual_seed(0)
    learner = build_learner(
        {"name": name, "inner_steps": 1},
        {"backbone": "my_backbone:build", "backbone_options": {"width": 4}},
        in_channels=3,
        way=WAY,
    )
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    episode = image_episode()
    losses = []
    for _ in range(8):
        loss, _ = learner.meta_loss(episode)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# -- a small meta-training run on synthetic episodes ----------------------------------------------


@pytest.fixture(scope="module")
def synthetic_splits():
    from episodes import build_split

    options = {"images_per_class": 12, "image_size": 16, "channels": 1, "seed": 0}
    return (
        build_split("synthetic", "train", num_classes=20, **options),
        build_split("synthetic", "test", num_classes=10, **options),
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maml", "static_nsn", "dynamic_nsn", "protonet"])
def test_meta_training_on_synthetic_episodes_beats_chance(name: str, synthetic_splits) -> None:
    from episodes import EpisodeSampler

    train, test = synthetic_splits
    torch.manual_seed(0)
    options = (
        {} if name == "protonet" else {"inner_steps": 1, "inner_steps_eval": 3, "inner_lr": 0.1}
    )
    learner = build_learner(
        {"name": name, **options},
        {"backbone": "conv4", "backbone_options": {"filters": 16, "image_size": 16}},
        in_channels=1,
        way=5,
    )
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-3)
    episodes = EpisodeSampler(train, way=5, shot=1, query=5, seed=0)
    for step in range(20):
        loss, _ = learner.meta_loss(episodes[step])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learner.eval()
    evaluation = EpisodeSampler(test, way=5, shot=1, query=5, seed=1)
    with torch.no_grad():
        accuracy = sum(learner.meta_loss(evaluation[i])[1].item() for i in range(16)) / 16
    print(f"{name}: accuracy {accuracy:.3f}")
    assert accuracy > 0.35, f"{name}: {accuracy:.3f} on unseen classes (chance 0.2)"
