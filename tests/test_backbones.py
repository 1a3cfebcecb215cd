"""Backbones: shapes, where the conv factory's layers land, the registry and plug-ins."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fewshot_nsl.backbones import (
    CNN9,
    Conv4,
    ResNet12,
    backbone_options,
    build_backbone,
    feature_dim,
    list_backbones,
    register_backbone,
)
from fewshot_nsl.backbones.pooling import activate_and_pool
from fewshot_nsl.nn import DynamicNSLConv2d, NSLConv2d

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONVS = {
    "plain": None,
    "static": {"kind": "static"},
    "dynamic": {"kind": "dynamic", "granularity": "sample"},
}
# Small settings per backbone so that every (backbone, conv kind) pair runs in well under 1 s.
SMALL = {
    "conv4": ({"filters": 4, "image_size": 16}, 16),
    "resnet12": ({"widths": (4, 6, 8, 10)}, 16),
    "cnn9": ({"widths": (4, 6, 8), "root_width": 4}, 16),
}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster than two that synchronise, and
    keeps the suite quick on a loaded 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def count(module: nn.Module, layer_type: type) -> int:
    return sum(type(m) is layer_type for m in module.modules())


def test_registry_lists_the_three_backbones() -> None:
    assert {"conv4", "resnet12", "cnn9"} <= set(list_backbones())


@pytest.mark.parametrize("kind", sorted(CONVS))
@pytest.mark.parametrize("name", sorted(SMALL))
def test_features_shape_and_out_features(name: str, kind: str) -> None:
    options, size = SMALL[name]
    backbone = build_backbone(name, in_channels=3, conv=CONVS[kind], **options)
    features = backbone(torch.randn(3, 3, size, size))
    assert features.shape == (3, backbone.out_features)
    assert feature_dim(backbone, (3, size, size)) == backbone.out_features
    assert backbone.training  # feature_dim restores the mode


@pytest.mark.parametrize(
    "name, factory_convs, plain_convs",
    # conv4: all 4 convs; resnet12: 3 per stage (1×1 shortcuts stay plain);
    # cnn9: the 9 stage convs (root and classifier stay plain).
    [("conv4", 4, 0), ("resnet12", 12, 4), ("cnn9", 9, 1)],
)
def test_every_factory_conv_becomes_nsl(name: str, factory_convs: int, plain_convs: int) -> None:
    options, _ = SMALL[name]
    plain = build_backbone(name, in_channels=3, **options)
    static = build_backbone(name, in_channels=3, conv={"kind": "static"}, **options)
    dynamic = build_backbone(name, in_channels=3, conv={"kind": "dynamic"}, **options)
    assert count(plain, nn.Conv2d) == factory_convs + plain_convs
    assert count(static, NSLConv2d) == factory_convs
    assert count(dynamic, DynamicNSLConv2d) == factory_convs
    # static NSL layers hold no nn.Conv2d: what is left plain is exactly the non-factory convs
    assert count(static, nn.Conv2d) == plain_convs


def test_backbone_options_lists_defaults() -> None:
    assert backbone_options("conv4") == {
        "filters": 32,
        "image_size": 84,
        "pool": "flatten",
        "downsample": "max_pool",
        "init": "default",
        "norm_eps": 1e-5,
    }
    assert backbone_options(lambda **anything: nn.Identity()) is None


def test_conv4_reference_sizes() -> None:
    maml = build_backbone("conv4", in_channels=3, filters=32, image_size=84)
    assert isinstance(maml, Conv4) and maml.out_features == 32 * 5 * 5
    assert feature_dim(maml, (3, 84, 84)) == 800
    protonet = build_backbone("conv4", in_channels=1, filters=64, pool="avg")
    assert protonet(torch.randn(2, 1, 28, 28)).shape == (2, 64)


def test_conv4_wrong_image_size_is_an_error() -> None:
    backbone = build_backbone("conv4", in_channels=3, filters=4, image_size=32)
    with pytest.raises(ValueError, match="image_size"):
        backbone(torch.randn(2, 3, 16, 16))


def test_resnet12_default_widths() -> None:
    backbone = build_backbone("resnet12", in_channels=3)
    assert isinstance(backbone, ResNet12) and backbone.out_features == 640
    widths = [s.conv1.out_channels for s in backbone.stages]
    assert widths == [64, 160, 320, 640]


def test_cnn9_classifier_head() -> None:
    backbone = build_backbone("cnn9", in_channels=3, num_classes=10, image_size=32)
    assert isinstance(backbone, CNN9) and backbone.out_features == 10
    assert backbone.classifier.kernel_size == (4, 4)
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert [stage[0][0].out_channels for stage in backbone.stages] == [32, 64, 128]


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg'.*conv4"):
        build_backbone("vgg", in_channels=3)
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        build_backbone("no_such_module_xyz:build", in_channels=3)
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        build_backbone("fewshot_nsl.backbones:missing", in_channels=3)
    with pytest.raises(ValueError, match="filters"):
        build_backbone("conv4", in_channels=3, filters=0)
    with pytest.raises(ValueError, match="unknown option.*'depth'.*allowed options.*'filters'"):
        build_backbone("conv4", in_channels=3, depth=5)
    with pytest.raises(ValueError, match="ConvSpec.kind"):
        build_backbone("conv4", in_channels=3, conv={"kind": "nsl"})
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("conv4", in_channels=0)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("conv4")(lambda **kw: nn.Identity())


def test_plugin_example_gets_nsl_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    backbone = build_backbone("my_backbone:build", in_channels=3, conv={"kind": "static"}, width=4)
    assert count(backbone, NSLConv2d) == 2
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, backbone.out_features)


def test_plugin_from_a_tmp_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tmp_backbones_pkg.py").write_text(
        textwrap.dedent("""
        from torch import nn

        class Net(nn.Module):
            def __init__(self, conv, in_channels, width):
                super().__init__()
                self.conv = conv(in_channels, width, 3, padding=1)
                self.out_features = width

            def forward(self, x):
                return self.conv(x).mean(dim=(2, 3))

        class Factories:
            @staticmethod
            def build(*, conv_factory, in_channels, width=3):
                return Net(conv_factory, in_channels, width)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    backbone = build_backbone(
        "tmp_backbones_pkg:Factories.build", in_channels=2, conv={"kind": "dynamic"}, width=5
    )
    assert count(backbone, DynamicNSLConv2d) == 1
    assert backbone(torch.randn(4, 2, 8, 8)).shape == (4, 5)
    sys.modules.pop("tmp_backbones_pkg", None)


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.LeakyReLU(0.1)], ids=["relu", "leaky"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_activate_and_pool_matches_the_reference_order_bit_for_bit(activation, ties) -> None:
    """Pooling before the activation (activate_and_pool) gives the reference order's values,
    first and second derivatives exactly, also where windows hold equal elements."""
    generator = torch.Generator().manual_seed(3)
    if ties:  # few distinct values: most windows hold equal maxima, many all non-positive
        h0 = torch.randint(-2, 3, (3, 4, 8, 10), generator=generator).double()
    else:
        h0 = torch.randn(3, 4, 8, 10, generator=generator, dtype=torch.float64)
    upstream = torch.randn(3, 4, 4, 5, generator=generator, dtype=torch.float64)
    pool = nn.MaxPool2d(2)

    def derivatives(order):
        h = h0.clone().requires_grad_()
        out = order(h)
        (first,) = torch.autograd.grad((out * upstream).sum(), h, create_graph=True)
        (second,) = torch.autograd.grad((first * first.detach() + first).sum(), h)
        return out.detach(), first.detach(), second

    fast = derivatives(lambda h: activate_and_pool(activation, pool, h))
    reference = derivatives(lambda h: pool(activation(h)))
    for mine, theirs in zip(fast, reference):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("activation", [nn.GELU(), nn.LeakyReLU(-0.5)], ids=["gelu", "slope<0"])
def test_activate_and_pool_keeps_the_order_where_it_matters(activation) -> None:
    """Activations that decrease somewhere (GELU below -0.75, a leaky ReLU with a negative
    slope) do not commute with max-pooling: the reference order is kept."""
    # window [-3, -0.5, -4, -5]: its largest element -0.5 maps to GELU -0.154 (leaky 0.25),
    # but -3 to -0.004 (leaky 1.5): pooling first would pick the wrong element
    h = torch.tensor([[-3.0, -0.5], [-4.0, -5.0]], dtype=torch.float64).repeat(2, 3, 3, 3)
    out = activate_and_pool(activation, nn.MaxPool2d(2), h)
    assert torch.equal(out, nn.MaxPool2d(2)(activation(h)))
    assert not torch.equal(out, activation(nn.MaxPool2d(2)(h)))
