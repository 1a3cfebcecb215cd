"""Fidelity to the NSL authors' CIFAR code (github.com/wy1iu/NSL, TensorFlow 1.x).

Each test re-derives a piece of their TensorFlow graph independently, in float64 on tiny
inputs: NHWC tensors, ``SAME`` convolutions written as explicit sums over kernel taps (no
``F.conv2d``/``F.unfold``), batch moments as in ``tf.nn.moments`` + ``batch_normalization``.
What is re-derived (``experiments_cifar10/dynamic_{dns,uns}/architecture.py``, ``loss.py``):

* predictor ``m1``: ``conv3x3(x) / sqrt(conv3x3(x*x, ones) + 1e-4)`` (the input norm at the
  conv's own geometry divides the conv's *output*), no bias; diagonal form: batch norm
  (eps 1e-3), ReLU; ``m2``: conv3x3, no bias; diagonal: batch norm again; then ``+ 1`` (full:
  ``+ eye(9)``, and no batch norm at all);
* the main convolution weights each tap's response by the mask (their response-side layout);
* ``tf.contrib.layers.l2_regularizer(5e-3)(M) = 5e-3 * sum(M^2) / 2`` on the static full M.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewshot_nsl.nn import DynamicNSLConv2d, NSLConv2d, SimilarityPredictor, similarity_penalty
from fewshot_nsl.ops import ConvGeometry
from fewshot_nsl.supervised.config import load_supervised_config
from fewshot_nsl.supervised.model import build_model

DTYPE = torch.float64
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SAME_3X3 = ConvGeometry((1, 1), (1, 1), (1, 1))


def tf_conv3x3_same(x: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """``tf.nn.conv2d(x, filt, [1, 1, 1, 1], 'SAME')`` for NHWC ``x`` and HWIO ``filt``
    (3x3): a sum over the nine taps of the zero-padded shifted input times the tap's matrix."""
    _, height, width, _ = x.shape
    padded = torch.zeros(x.shape[0], height + 2, width + 2, x.shape[3], dtype=x.dtype)
    padded[:, 1:-1, 1:-1] = x
    out = 0.0
    for i in range(3):
        for j in range(3):
            out = out + padded[:, i : i + height, j : j + width, :] @ filt[i, j]
    return out


def tf_batch_norm(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Training-mode ``batch_norm`` of the authors (gamma 1, beta 0 at initialisation):
    ``tf.nn.moments`` over N, H, W (biased variance), then ``(x - mean) / sqrt(var + eps)``."""
    axes = tuple(range(x.dim() - 1))
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def authors_mask(x: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor, diagonal: bool):
    """The authors' ``_combined_conv`` mask for NHWC ``x``: ``(N, H, W, 9[, 9])``."""
    channels = x.shape[3]
    conv = tf_conv3x3_same(x, f1)
    input_norm = torch.sqrt(
        tf_conv3x3_same(x * x, torch.ones(3, 3, channels, 1, dtype=DTYPE)) + 1e-4
    )
    h = conv / input_norm
    if diagonal:
        h = tf_batch_norm(h)
    m = tf_conv3x3_same(torch.relu(h), f2)
    if diagonal:
        return tf_batch_norm(m) + 1.0
    n, height, width, _ = m.shape
    return m.reshape(n, height, width, 9, 9) + torch.eye(9, dtype=DTYPE)


def authors_main_conv(x: torch.Tensor, filt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``_1dcond_conv_layer`` / ``_2dcond_conv_layer`` without their batch norm, NHWC:
    tap ``k``'s response ``x(. + k') @ W[k]`` weighted by ``mask[..., k, k']`` and summed."""
    _, height, width, _ = x.shape
    padded = torch.zeros(x.shape[0], height + 2, width + 2, x.shape[3], dtype=x.dtype)
    padded[:, 1:-1, 1:-1] = x
    full = torch.diag_embed(mask) if mask.dim() == 4 else mask
    out = 0.0
    for k in range(9):  # tap whose kernel slice is used
        for q in range(9):  # shift at which the input is read
            shifted = padded[:, q // 3 : q // 3 + height, q % 3 : q % 3 + width, :]
            out = out + full[..., k, q, None] * (shifted @ filt[k // 3, k % 3])
    return out


def hwio(weight: torch.Tensor) -> torch.Tensor:
    """PyTorch ``(O, I, kh, kw)`` -> TensorFlow ``(kh, kw, I, O)``."""
    return weight.permute(2, 3, 1, 0)


def nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("diagonal", [True, False])
def test_authors_predictor_matches_their_graph(diagonal):
    torch.manual_seed(0)
    similarity = "diagonal" if diagonal else "full"
    predictor = SimilarityPredictor(3, 3, similarity, "location", hidden=5, style="authors")
    predictor = predictor.double().train()
    # No biases anywhere; batch norm after both convolutions for the diagonal form only.
    assert predictor.conv1.bias is None and predictor.head.bias is None
    norms = [m for m in predictor.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == (2 if diagonal else 0)
    assert all((m.eps, m.momentum) == (1e-3, 1e-3) for m in norms)  # TF eps, decay 0.999
    with torch.no_grad():  # weights large enough that every term matters
        predictor.conv1.weight.normal_()
        predictor.head.weight.normal_()
    x = torch.randn(4, 6, 5, 3, dtype=DTYPE)  # NHWC
    got = predictor(nchw(x), SAME_3X3)
    want = authors_mask(x, hwio(predictor.conv1.weight), hwio(predictor.head.weight), diagonal)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("diagonal", [True, False])
def test_authors_dynamic_layer_matches_their_graph(diagonal):
    """The whole dynamic layer (our input-side mixing) equals their response-side sum."""
    torch.manual_seed(2)
    layer = DynamicNSLConv2d(
        3,
        4,
        3,
        padding=1,
        bias=False,
        similarity="diagonal" if diagonal else "full",
        granularity="location",
        hidden=5,
        predictor_style="authors",
    ).double()
    with torch.no_grad():
        layer.predictor.head.weight.normal_()
    x = torch.randn(2, 5, 4, 3, dtype=DTYPE)
    predictor = layer.predictor
    mask = authors_mask(x, hwio(predictor.conv1.weight), hwio(predictor.head.weight), diagonal)
    want = nchw(authors_main_conv(x, hwio(layer.weight), mask))
    torch.testing.assert_close(layer(nchw(x)), want, rtol=1e-10, atol=1e-10)


def test_toolkit_predictor_differs_from_the_authors():
    """The two styles are different predictors (so the option means something)."""
    torch.manual_seed(3)
    toolkit = SimilarityPredictor(3, 3, "diagonal", "location", hidden=5).double()
    assert toolkit.style == "toolkit" and toolkit.head.bias is not None
    x = torch.randn(4, 6, 5, 3, dtype=DTYPE)
    with torch.no_grad():
        toolkit.conv1.weight.normal_()
        toolkit.head.weight.normal_()
    want = authors_mask(x, hwio(toolkit.conv1.weight), hwio(toolkit.head.weight), True)
    assert (toolkit(nchw(x), SAME_3X3) - want).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# The M penalty of the CIFAR configs
# --------------------------------------------------------------------------------------------
def tf_l2_regularizer(scale: float, tensor: torch.Tensor) -> torch.Tensor:
    """``tf.contrib.layers.l2_regularizer(scale)(t) = scale * tf.nn.l2_loss(t)``,
    ``l2_loss(t) = sum(t ** 2) / 2``."""
    return scale * (tensor**2).sum() / 2


def config_penalty(config: dict, model: torch.nn.Module) -> torch.Tensor:
    """The penalty term a supervised config adds to the loss (``train.similarity_penalty``
    times ``similarity_penalty`` of ``M`` or ``M - I`` per ``train.penalty_target``)."""
    train = config["train"]
    relative = train["penalty_target"] == "identity"
    return train["similarity_penalty"] * similarity_penalty(model, relative_to_identity=relative)


def randomised_model(config: dict) -> torch.nn.Module:
    model = build_model(config["model"], image_shape=(3, 32, 32), num_classes=10).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NSLConv2d) and module.M is not None:
                module.M.add_(torch.randn_like(module.M))
    return model


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_static_full_penalty_is_the_authors_l2_regularizer(dataset):
    torch.manual_seed(4)
    config = load_supervised_config(CONFIGS / f"{dataset}_cnn9_static_shared.yaml")
    model = randomised_model(config)
    blocks = [m.M for m in model.modules() if isinstance(m, NSLConv2d) and m.M is not None]
    assert len(blocks) == 9 and all(M.shape == (9, 9) for M in blocks)
    want = sum(tf_l2_regularizer(5e-3, M) for M in blocks)
    torch.testing.assert_close(config_penalty(config, model), want, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_static_diagonal_has_no_penalty_as_the_authors(dataset):
    torch.manual_seed(5)
    config = load_supervised_config(CONFIGS / f"{dataset}_cnn9_static_diagonal.yaml")
    assert config["model"]["conv"]["similarity"] == "diagonal"
    model = randomised_model(config)
    assert float(config_penalty(config, model).detach()) == 0.0


# --------------------------------------------------------------------------------------------
# CIFAR pipeline details: SYMMETRIC crop padding, raw pixels, BN settings, He-normal init
# --------------------------------------------------------------------------------------------
def test_symmetric_pad_is_tensorflows_symmetric_mode():
    """``tf.pad(..., "SYMMETRIC")`` mirrors including the edge: numpy's ``"symmetric"``."""
    import numpy as np

    from fewshot_nsl.supervised.data import symmetric_pad

    images = torch.randn(2, 3, 5, 6, dtype=DTYPE)
    want = np.pad(images.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="symmetric")
    torch.testing.assert_close(symmetric_pad(images, 4), torch.from_numpy(want))
    with pytest.raises(ValueError, match="symmetric padding"):
        symmetric_pad(images, 6)


def test_crop_paddings_draw_the_same_crops():
    """Zero and symmetric padding crop the same windows: only the border content differs."""
    from episodes.transforms import Compose
    from fewshot_nsl.supervised.data import crop_flip_augmentation

    images = torch.rand(16, 3, 8, 8, dtype=DTYPE) + 1.0  # no zeros inside the images
    outs = {}
    for mode in ("zeros", "symmetric"):
        augment = Compose(crop_flip_augmentation((3, 8, 8), 4, mode))
        outs[mode] = augment(images, torch.Generator().manual_seed(0))
    inside = outs["zeros"] != 0
    torch.testing.assert_close(outs["symmetric"][inside], outs["zeros"][inside])
    assert (outs["symmetric"] != 0).all() and (~inside).any()


def test_raw_pixel_input_gives_the_network_0_to_255():
    from episodes.transforms import Normalize
    from fewshot_nsl.supervised.data import input_statistics, load_synthetic

    data = load_synthetic(num_classes=2, train_per_class=2, test_per_class=1, image_size=8)
    pixels = torch.as_tensor(data.train_images).permute(0, 3, 1, 2).float()
    raw = Normalize(*input_statistics(data, "raw_pixels"))(pixels / 255.0)
    torch.testing.assert_close(raw, pixels, rtol=1e-6, atol=1e-4)
    assert input_statistics(data) == (data.mean, data.std)


def test_cnn9_authors_batch_norm_and_he_normal_init():
    from fewshot_nsl.backbones import build_backbone

    torch.manual_seed(6)
    net = build_backbone(
        "cnn9",
        in_channels=3,
        conv={"kind": "static", "similarity": "diagonal"},
        widths=(32, 64, 128),
        num_classes=10,
        batch_norm_eps=1e-3,
        batch_norm_momentum=1e-3,
        init="he_normal",
    )
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 10 and all((m.eps, m.momentum) == (1e-3, 1e-3) for m in norms)
    kernels = [net.root[0], *(layer[0] for stage in net.stages for layer in stage[:3])]
    for conv in [*kernels, net.classifier]:
        fan_in = conv.weight[0].numel()
        std = conv.weight.std().item()
        assert abs(std / (2.0 / fan_in) ** 0.5 - 1.0) < 0.15, (type(conv).__name__, std)
        assert conv.bias is None or not conv.bias.any()
    with pytest.raises(ValueError, match="cnn9 option 'init'"):
        build_backbone("cnn9", in_channels=3, init="xavier")


# --------------------------------------------------------------------------------------------
# The CIFAR configs: the authors' input pipeline reachable from the config, a reference block
# --------------------------------------------------------------------------------------------
def test_config_crop_padding_reaches_the_training_transform():
    """A constant image stays constant under a symmetric-padded crop, not a zero-padded one."""
    from episodes.transforms import Normalize
    from fewshot_nsl.supervised.train import train_transform

    images = torch.ones(8, 3, 8, 8)
    outs = {}
    for mode in ("zeros", "symmetric"):
        transform = train_transform((3, 8, 8), True, Normalize((0.0,) * 3, (1.0,) * 3), mode)
        outs[mode] = transform(images, torch.Generator().manual_seed(1))
    assert (outs["symmetric"] == 1).all() and (outs["zeros"] == 0).any()


def test_config_raw_pixels_fill_mean_zero_std_one_over_255():
    from fewshot_nsl.supervised.data import load_synthetic
    from fewshot_nsl.supervised.train import record_data_properties

    data = load_synthetic(num_classes=2, train_per_class=2, test_per_class=1, image_size=8)
    raw, standard = {"input_scale": "raw_pixels"}, {"input_scale": "standardized"}
    record_data_properties(raw, data)
    record_data_properties(standard, data)
    assert raw["mean"] == [0.0] * 3 and raw["std"] == [1.0 / 255.0] * 3
    assert standard["mean"] == list(data.mean) and standard["std"] == list(data.std)


SUPERVISED_CONFIGS = sorted(
    [*CONFIGS.glob("cifar*.yaml"), CONFIGS / "supervised_quickstart.yaml"], key=str
)


@pytest.mark.parametrize("path", SUPERVISED_CONFIGS, ids=lambda p: p.stem)
def test_every_supervised_config_says_what_it_reproduces(path):
    config = load_supervised_config(path)
    reference = config["reference"]
    assert set(reference) == {"paper", "code", "reproduces", "published", "protocol", "deviations"}
    assert isinstance(reference["deviations"], list) and reference["reproduces"]
    data, conv = config["data"], config["model"]["conv"]
    authors = "cnn9" in path.stem and path.stem.startswith("cifar")
    if authors:  # the authors' CNN-9 pipeline
        assert (data["crop_padding"], data["input_scale"]) == ("symmetric", "raw_pixels")
        options = config["model"]["backbone_options"]
        assert (options["batch_norm_eps"], options["batch_norm_momentum"]) == (1e-3, 1e-3)
        assert options["init"] == "he_normal"
        assert conv["kind"] != "dynamic" or conv["predictor_style"] == "authors"
        full_static = conv["kind"] == "static" and conv["similarity"] == "full"
        train = config["train"]
        assert train["similarity_penalty"] == (2.5e-3 if full_static else 0.0)
        assert train["penalty_target"] == "zero"
    else:
        assert (data["crop_padding"], data["input_scale"]) == ("zeros", "standardized")
        assert any("not" in line for line in reference["deviations"])


def test_static_diagonal_cifar_configs_exist():
    for dataset in ("cifar10", "cifar100"):
        config = load_supervised_config(CONFIGS / f"{dataset}_cnn9_static_diagonal.yaml")
        assert config["model"]["conv"]["similarity"] == "diagonal"
        assert "static_dns" in config["reference"]["code"]
