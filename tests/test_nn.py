"""NSL layers: static NSLConv2d (+fold, penalty), DynamicNSLConv2d, ConvSpec/ConvFactory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewshot_nsl.nn.dynamic as dynamic_module
from fewshot_nsl.nn import (
    ConvFactory,
    ConvSpec,
    DynamicNSLConv2d,
    NSLConv2d,
    SimilarityPredictor,
    fold_model,
    patch_norm,
    similarity_penalty,
)
from fewshot_nsl.ops import ConvGeometry, bilinear_conv2d_reference

DTYPE = torch.float64


def randomise_m(layer: NSLConv2d, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.M.add_(0.3 * torch.randn(layer.M.shape, generator=gen, dtype=layer.M.dtype))


@pytest.mark.parametrize("similarity", ["full", "diagonal", "identity"])
@pytest.mark.parametrize("granularity", ["shared", "channel"])
def test_static_fresh_layer_equals_conv2d(similarity, granularity):
    torch.manual_seed(0)
    layer = NSLConv2d(3, 5, 3, stride=2, padding=1, similarity=similarity, granularity=granularity)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    conv.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(layer(x), conv(x))
    names = {name for name, _ in layer.named_parameters()}
    assert names == ({"weight", "bias"} if similarity == "identity" else {"weight", "bias", "M"})
    assert layer.similarity_penalty().item() == 0.0


@pytest.mark.parametrize(
    ("similarity", "granularity", "shape"),
    [
        ("full", "shared", (9, 9)),
        ("diagonal", "shared", (9,)),
        ("full", "channel", (4, 9, 9)),
        ("diagonal", "channel", (4, 9)),
    ],
)
def test_static_matches_reference(similarity, granularity, shape):
    torch.manual_seed(1)
    layer = NSLConv2d(
        4, 3, 3, padding=1, dilation=2, similarity=similarity, granularity=granularity
    ).double()
    assert tuple(layer.M.shape) == shape
    randomise_m(layer)
    x = torch.randn(2, 4, 8, 8, dtype=DTYPE)
    geometry = ConvGeometry((1, 1), (1, 1), (2, 2))
    expected = bilinear_conv2d_reference(
        x, layer.weight, layer.M, geometry, granularity, similarity == "diagonal"
    ) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("similarity", ["full", "diagonal"])
@pytest.mark.parametrize("granularity", ["shared", "channel"])
def test_fold_equals_layer(similarity, granularity):
    torch.manual_seed(2)
    layer = NSLConv2d(3, 4, 3, stride=2, padding=1, similarity=similarity, granularity=granularity)
    randomise_m(layer)
    x = torch.randn(2, 3, 9, 9)
    folded = layer.fold()
    assert type(folded) is nn.Conv2d
    torch.testing.assert_close(folded(x), layer(x), rtol=1e-5, atol=1e-5)


def test_fold_model_leaves_only_conv2d():
    torch.manual_seed(3)
    factory = ConvFactory(ConvSpec(kind="static", similarity="diagonal", granularity="channel"))
    model = nn.Sequential(
        factory(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(factory(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)),
        factory(8, 4, 1),
    ).eval()
    for module in model.modules():
        if isinstance(module, NSLConv2d):
            randomise_m(module)
    x = torch.randn(2, 3, 10, 10)
    expected = model(x)
    assert fold_model(model) is model
    assert not any(isinstance(m, NSLConv2d) for m in model.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 3
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_sphere_normalisation_and_no_fold():
    torch.manual_seed(4)
    layer = NSLConv2d(3, 4, 3, padding=1, similarity="full", normalize="sphere").double()
    randomise_m(layer)
    x = torch.randn(2, 3, 6, 6, dtype=DTYPE)
    eff = layer.effective_weight()
    # Independent check via unfold: cosine-like response per patch and filter.
    cols = F.unfold(x, 3, padding=1)  # (B, C*HV, L)
    raw = torch.einsum("ok,bkl->bol", eff.flatten(1), cols)
    denom = (eff.flatten(1).pow(2).sum(1) + 1e-4).sqrt()[None, :, None] * (
        cols.pow(2).sum(1, keepdim=True) + 1e-4
    ).sqrt()
    expected = (raw / denom).view(2, 4, 6, 6) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    assert (layer(x) - layer.bias.view(1, -1, 1, 1)).abs().max() <= 1.0
    with pytest.raises(ValueError, match="sphere"):
        layer.fold()


def test_diagonal_one_hot_keeps_one_tap():
    torch.manual_seed(5)
    layer = NSLConv2d(3, 4, 3, padding=1, similarity="diagonal").double()
    tap = 5
    with torch.no_grad():
        layer.M.zero_()
        layer.M[tap] = 1.0
    masked = torch.zeros_like(layer.weight)
    masked[:, :, tap // 3, tap % 3] = layer.weight[:, :, tap // 3, tap % 3]
    x = torch.randn(2, 3, 7, 7, dtype=DTYPE)
    torch.testing.assert_close(layer(x), F.conv2d(x, masked, layer.bias, padding=1))


def test_similarity_penalty():
    torch.manual_seed(6)
    layer = NSLConv2d(2, 2, 3, similarity="full")
    with torch.no_grad():
        layer.M.add_(0.5)
    torch.testing.assert_close(layer.similarity_penalty(), torch.tensor(81 * 0.25))
    torch.testing.assert_close(
        layer.similarity_penalty(relative_to_identity=False),
        (torch.eye(9) + 0.5).pow(2).sum(),
    )
    diag = NSLConv2d(2, 2, 3, similarity="diagonal", granularity="channel")
    model = nn.Sequential(layer, nn.ReLU(), diag, NSLConv2d(2, 2, 3, similarity="identity"))
    total = similarity_penalty(model)
    torch.testing.assert_close(total, torch.tensor(81 * 0.25))
    torch.testing.assert_close(
        similarity_penalty(model, relative_to_identity=False),
        (torch.eye(9) + 0.5).pow(2).sum() + 18.0,
    )
    total.backward()
    assert layer.M.grad is not None
    assert float(similarity_penalty(nn.Sequential(nn.Conv2d(1, 1, 1)))) == 0.0


def test_static_bad_arguments():
    with pytest.raises(ValueError, match="similarity must be one of"):
        NSLConv2d(1, 1, 3, similarity="cosine")
    with pytest.raises(ValueError, match="granularity must be one of"):
        NSLConv2d(1, 1, 3, granularity="sample")
    with pytest.raises(ValueError, match="sharing must be one of"):
        NSLConv2d(1, 1, 3, sharing="channel")


def test_static_sharing_is_an_alias_of_granularity():
    """The paper's ``sharing: shared | disjoint`` names the static granularity."""
    assert NSLConv2d(2, 1, 3, sharing="disjoint").granularity == "channel"
    assert NSLConv2d(2, 1, 3, sharing="shared", granularity="shared").granularity == "shared"
    with pytest.raises(ValueError, match="sharing='disjoint' means granularity='channel'"):
        NSLConv2d(2, 1, 3, sharing="disjoint", granularity="shared")
    spec = ConvSpec.from_dict({"kind": "static", "sharing": "disjoint"})
    assert spec.granularity == "channel" and "sharing" not in spec.to_dict()
    with pytest.raises(ValueError, match=r"ConvSpec.sharing='shared' means ConvSpec.granul"):
        ConvSpec.from_dict({"kind": "static", "sharing": "shared", "granularity": "channel"})
    with pytest.raises(ValueError, match="normalize must be one of"):
        NSLConv2d(1, 1, 3, normalize="l2")


@pytest.mark.parametrize("similarity", ["diagonal", "full"])
@pytest.mark.parametrize("granularity", ["location", "sample"])
def test_dynamic_fresh_layer_close_to_conv(similarity, granularity):
    torch.manual_seed(7)
    layer = DynamicNSLConv2d(
        6, 8, 3, stride=2, padding=1, similarity=similarity, granularity=granularity
    )
    x = torch.randn(4, 6, 11, 11)
    out = layer(x)
    plain = F.conv2d(x, layer.weight, layer.bias, 2, 1)
    rel = (out - plain).norm() / plain.norm()
    assert 0 < rel < 1e-2
    M = layer.predict_similarity(x)
    taps = (9,) if similarity == "diagonal" else (9, 9)
    lead = (4, 6, 6) if granularity == "location" else (4,)
    assert tuple(M.shape) == lead + taps


@pytest.mark.parametrize("similarity", ["diagonal", "full"])
@pytest.mark.parametrize("granularity", ["location", "sample"])
def test_dynamic_uses_predicted_m(similarity, granularity):
    torch.manual_seed(8)
    layer = DynamicNSLConv2d(
        3,
        4,
        3,
        padding=1,
        dilation=2,
        similarity=similarity,
        granularity=granularity,
        hidden=8,
        predictor_batch_norm=False,
    ).double()
    with torch.no_grad():  # make the predictor's contribution large enough to matter
        layer.predictor.head.weight.mul_(1000.0)
    x = torch.randn(2, 3, 7, 7, dtype=DTYPE)
    M = layer.predict_similarity(x)
    geometry = ConvGeometry((1, 1), (1, 1), (2, 2))
    expected = bilinear_conv2d_reference(
        x, layer.weight, M, geometry, granularity, similarity == "diagonal"
    ) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    assert (layer(x) - F.conv2d(x, layer.weight, layer.bias, 1, 1, 2)).abs().max() > 1e-3
    # Gradients reach the kernel and every predictor parameter.
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None
    for name, param in layer.predictor.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_predictor_batch_norm_optional():
    with_bn = DynamicNSLConv2d(3, 4, 3, similarity="diagonal")
    without = DynamicNSLConv2d(3, 4, 3, similarity="diagonal", predictor_batch_norm=False)
    full = DynamicNSLConv2d(3, 4, 3, similarity="full")
    assert {n for n, _ in with_bn.named_buffers()} == {
        "predictor.norm.running_mean",
        "predictor.norm.running_var",
        "predictor.norm.num_batches_tracked",
    }
    assert list(without.named_buffers()) == [] and list(full.named_buffers()) == []


def test_dynamic_works_under_functional_call():
    torch.manual_seed(9)
    layer = DynamicNSLConv2d(3, 4, 3, padding=1, granularity="sample", predictor_batch_norm=False)
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    x = torch.randn(2, 3, 6, 6)
    out = torch.func.functional_call(layer, params, (x,))
    torch.testing.assert_close(out, layer(x))
    grads = torch.autograd.grad(out.sum(), list(params.values()))
    assert all(g is not None for g in grads)


def test_patch_norm_matches_unfold():
    x = torch.randn(2, 3, 7, 6, dtype=DTYPE)
    expected = (F.unfold(x, (3, 2), dilation=2, padding=1, stride=2).pow(2).sum(1) + 1e-4).sqrt()
    out = patch_norm(x, (3, 2), stride=2, padding=1, dilation=2)
    torch.testing.assert_close(out.flatten(1), expected)


@pytest.mark.parametrize("kernel, dilation", [((2, 2), 1), ((3, 2), 1), ((2, 4), 2), ((3, 3), 2)])
def test_patch_norm_same_padding_matches_naive_loop(kernel, dilation):
    """padding="same", even kernels included: output at the input size, the window of (i, j)
    starting ``dilation * (k - 1) // 2`` before it (the odd zero row/column after the image,
    as conv2d's "same" does), checked against a loop over windows."""
    x = torch.randn(2, 3, 5, 6, dtype=DTYPE)
    (kh, kw), d = kernel, dilation
    squares = x.pow(2).sum(1)
    expected = torch.zeros(2, 1, 5, 6, dtype=DTYPE)
    for i in range(5):
        for j in range(6):
            for a in range(kh):
                for b in range(kw):
                    row, col = i - d * (kh - 1) // 2 + d * a, j - d * (kw - 1) // 2 + d * b
                    if 0 <= row < 5 and 0 <= col < 6:
                        expected[:, 0, i, j] += squares[:, row, col]
    out = patch_norm(x, kernel, padding="same", dilation=dilation)
    torch.testing.assert_close(out, (expected + 1e-4).sqrt(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------
def test_conv_spec_defaults_and_validation():
    assert ConvSpec().kind == "plain"
    assert ConvSpec(kind="static").similarity == "full"
    assert ConvSpec(kind="dynamic").similarity == "diagonal"
    # One default granularity per kind, shared with the layers' own defaults.
    assert ConvSpec(kind="static").granularity == NSLConv2d(1, 1, 3).granularity == "shared"
    assert ConvSpec(kind="dynamic").granularity == "sample"
    assert DynamicNSLConv2d(1, 1, 3).granularity == "sample"
    with pytest.raises(ValueError, match="ConvSpec.granularity must be one of"):
        ConvSpec(kind="dynamic", granularity="channel")
    spec = ConvSpec.from_dict({"kind": "dynamic", "granularity": "sample", "hidden": 16})
    assert ConvSpec.from_dict(spec.to_dict()) == spec
    assert ConvSpec.from_dict(None) == ConvSpec()
    with pytest.raises(ValueError, match=r"ConvSpec.kind must be one of \('plain'"):
        ConvSpec(kind="nsl")
    with pytest.raises(ValueError, match="ConvSpec.similarity must be one of"):
        ConvSpec(kind="dynamic", similarity="identity")
    with pytest.raises(ValueError, match="ConvSpec.predictor must be one of"):
        ConvSpec(kind="dynamic", predictor="global")
    with pytest.raises(ValueError, match="ConvSpec.hidden"):
        ConvSpec(hidden=0)
    with pytest.raises(ValueError, match="unknown ConvSpec field"):
        ConvSpec.from_dict({"kind": "static", "simularity": "full"})
    with pytest.raises(AttributeError):
        spec.kind = "plain"  # frozen


def test_factory_builds_each_kind():
    x = torch.randn(2, 3, 8, 8)
    plain = ConvFactory()(3, 4, 3, stride=2, padding=1, bias=False)
    assert type(plain) is nn.Conv2d and plain.bias is None and plain.stride == (2, 2)
    static = ConvFactory({"kind": "static", "similarity": "diagonal"})(3, 4, 3, padding=1)
    assert isinstance(static, NSLConv2d) and static.M.shape == (9,)
    dynamic = ConvFactory(ConvSpec(kind="dynamic", granularity="sample"))(3, 4, 3, 2, 1)
    assert isinstance(dynamic, DynamicNSLConv2d) and dynamic.granularity == "sample"
    assert plain(x).shape == dynamic(x).shape == (2, 4, 4, 4)
    assert static(x).shape == (2, 4, 8, 8)


def test_factory_shared_predictor():
    torch.manual_seed(10)
    factory = ConvFactory(ConvSpec(kind="dynamic", predictor="shared", hidden=8))
    model = nn.Sequential(
        factory(3, 6, 3, padding=1),
        nn.ReLU(),
        factory(6, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        factory(6, 4, 1),
    )
    assert len(factory.shared_predictors) == 2  # one per kernel size: 3x3 and 1x1
    shared = factory.shared_predictors[0]
    assert model[0].predictor.shared is shared and model[2].predictor.shared is shared
    assert model[0].predictor.adapter.in_channels == 3
    assert model[2].predictor.adapter.in_channels == 6
    names = [n for n, _ in model.named_parameters()]
    assert sum(".shared.conv1.weight" in n for n in names) == 2  # deduplicated per kernel size
    assert all(".predictor." in n for n in names if "adapter" in n or "shared" in n)
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 4, 4, 4)
    model(x).sum().backward()
    assert shared.head.weight.grad is not None


def test_shared_predictor_must_match_layer():
    shared = SimilarityPredictor(8, 3, similarity="diagonal", granularity="sample")
    with pytest.raises(ValueError, match="granularity"):
        DynamicNSLConv2d(3, 4, 3, granularity="location", predictor=shared)
    with pytest.raises(ValueError, match="kernel_size"):
        DynamicNSLConv2d(3, 4, 5, granularity="sample", predictor=shared)


@pytest.mark.parametrize("kernel", [(3, 3), (5, 5), (3, 1), (2, 2)])
def test_sample_predictor_patch_rnorm_matches_patch_norm(kernel):
    x = torch.randn(3, 4, 4, 5, dtype=DTYPE)
    expected = 1.0 / patch_norm(x, kernel, padding="same")
    torch.testing.assert_close(
        dynamic_module._same_patch_rnorm(x, kernel), expected, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("size", [(16, 16), (21, 10), (4, 4), (8, 12)])
def test_sample_predictor_pool_matches_adaptive_pool(size):
    x = torch.randn(2, 3, *size, dtype=DTYPE)
    cells = (min(size[0], 4), min(size[1], 4))
    torch.testing.assert_close(
        dynamic_module._average_pool(x, cells),
        F.adaptive_avg_pool2d(x, cells),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("similarity", ["diagonal", "full"])
@pytest.mark.parametrize("size", [16, 21, 3])
def test_sample_predictor_pools_then_patch_normalises(similarity, size):
    """The per-sample M is: pool to <= SAMPLE_POOL cells, patch-normalise, conv1, [BN], ReLU,
    global mean, linear head, + identity (the order the SimilarityPredictor docstring states)."""
    torch.manual_seed(10)
    predictor = SimilarityPredictor(5, 3, similarity, "sample", hidden=6).double()
    with torch.no_grad():
        predictor.head.weight.mul_(100.0)
    x = torch.randn(4, 5, size, size, dtype=DTYPE)
    cells = min(size, dynamic_module.SAMPLE_POOL)
    pooled = F.adaptive_avg_pool2d(x, cells)
    normed = pooled / patch_norm(pooled, (3, 3), padding="same")
    h = F.conv2d(normed, predictor.conv1.weight, predictor.conv1.bias, padding=1)
    if similarity == "diagonal":  # BatchNorm by default, training mode: batch statistics
        h = F.batch_norm(h, None, None, predictor.norm.weight, predictor.norm.bias, True)
    delta = predictor.head(F.relu(h).mean(dim=(2, 3)))
    if similarity == "diagonal":
        expected = delta + 1.0
    else:
        expected = delta.view(4, 9, 9) + torch.eye(9, dtype=DTYPE)
    M = predictor(x, ConvGeometry((1, 1), (1, 1), (1, 1)))
    torch.testing.assert_close(M, expected, rtol=1e-10, atol=1e-10)
