"""bilinear_conv2d: every path against an independent reference, gradients, errors, dispatch."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import fewshot_nsl.ops.bilinear as bilinear_module
import fewshot_nsl.ops.torch_paths as torch_paths
from fewshot_nsl.ops import (
    BACKEND_ENV,
    ConvGeometry,
    backend,
    bilinear_conv2d,
    bilinear_conv2d_reference,
    bilinear_conv2d_torch,
    canonical_geometry,
    expected_m_shape,
    output_size,
)

GRANULARITIES = ("shared", "channel", "sample", "location")
DTYPE = torch.float64


def random_m(granularity, diagonal, batch, channels, taps, out_hw, generator):
    shape = expected_m_shape(granularity, diagonal, batch, channels, taps, out_hw)
    return torch.randn(shape, dtype=DTYPE, generator=generator)


def naive_bilinear_conv2d(x, weight, M, stride, padding, dilation, granularity, diagonal):
    """Python loops straight from the definition (tiny cases only)."""
    batch, channels, height, width = x.shape
    out_ch, _, kh, kw = weight.shape
    taps = kh * kw
    h_out, w_out = output_size((height, width), (kh, kw), stride, padding, dilation)
    out = torch.zeros(batch, out_ch, h_out, w_out, dtype=x.dtype)

    def m_entry(b, c, i, j, k, q):
        if M is None:
            return float(k == q)
        if granularity == "shared":
            block = M
        elif granularity == "channel":
            block = M[c]
        elif granularity == "sample":
            block = M[b]
        else:
            block = M[b, i, j]
        if diagonal:
            return float(block[k]) if k == q else 0.0
        return float(block[k, q])

    for b, o, i, j in itertools.product(range(batch), range(out_ch), range(h_out), range(w_out)):
        total = 0.0
        for c, k, q in itertools.product(range(channels), range(taps), range(taps)):
            m = m_entry(b, c, i, j, k, q)
            if m == 0.0:
                continue
            qi, qj = divmod(q, kw)
            row = i * stride[0] - padding[0] + qi * dilation[0]
            col = j * stride[1] - padding[1] + qj * dilation[1]
            if 0 <= row < height and 0 <= col < width:
                total += float(weight[o, c, k // kw, k % kw]) * m * float(x[b, c, row, col])
        out[b, o, i, j] = total
    return out


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("diagonal", [False, True])
def test_reference_matches_naive_loop(granularity, diagonal):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 5, 4, dtype=DTYPE, generator=gen)
    weight = torch.randn(2, 2, 2, 3, dtype=DTYPE, generator=gen)
    stride, padding, dilation = (2, 1), (1, 0), (1, 1)
    out_hw = output_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    M = random_m(granularity, diagonal, 2, 2, 6, out_hw, gen)
    geometry = ConvGeometry(stride, padding, dilation)
    ref = bilinear_conv2d_reference(x, weight, M, geometry, granularity, diagonal)
    naive = naive_bilinear_conv2d(x, weight, M, stride, padding, dilation, granularity, diagonal)
    torch.testing.assert_close(ref, naive, rtol=1e-10, atol=1e-10)


# (channels, out_channels, kernel, stride, padding, dilation, batch): a lean grid that still
# covers kernel 1/3/5, stride 1/2, padding 0/1/"same", dilation 1/2, B 1..4.
GEOMETRIES = [
    (3, 4, 3, 1, 1, 1, 2),
    (2, 5, 3, 2, 0, 1, 3),
    (3, 2, 3, 1, "same", 2, 1),
    (1, 3, 1, 1, 0, 1, 4),
    (2, 3, 5, 2, 2, 1, 2),
    (4, 2, (3, 1), (1, 2), (1, 0), (2, 1), 3),
]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
def test_fast_paths_match_reference(granularity, diagonal, geometry, monkeypatch):
    channels, out_ch, kernel, stride, padding, dilation, batch = geometry
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, 9, 8, dtype=DTYPE, generator=gen)
    weight = torch.randn(out_ch, channels, kh, kw, dtype=DTYPE, generator=gen)
    bias = torch.randn(out_ch, dtype=DTYPE, generator=gen)
    geom = canonical_geometry((kh, kw), stride, padding, dilation)
    out_hw = output_size(x.shape[2:], (kh, kw), *geom)
    M = random_m(granularity, diagonal, batch, channels, kh * kw, out_hw, gen)
    expected = bilinear_conv2d_reference(x, weight, M, geom, granularity, diagonal)
    expected = expected + bias.view(1, -1, 1, 1)

    direct = bilinear_conv2d_torch(x, weight, M, bias, geom, granularity, diagonal)
    torch.testing.assert_close(direct, expected, rtol=1e-10, atol=1e-10)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    dispatched = bilinear_conv2d(
        x, weight, M, bias, stride, padding, dilation, granularity=granularity, diagonal=diagonal
    )
    torch.testing.assert_close(dispatched, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("path", ["torch", "reference"])
def test_gradcheck(granularity, diagonal, path, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, path)
    gen = torch.Generator().manual_seed(2)
    batch, channels = 2, 2
    x = torch.randn(batch, channels, 4, 4, dtype=DTYPE, generator=gen, requires_grad=True)
    weight = torch.randn(3, channels, 3, 3, dtype=DTYPE, generator=gen, requires_grad=True)
    bias = torch.randn(3, dtype=DTYPE, generator=gen, requires_grad=True)
    out_hw = output_size((4, 4), 3, 2, 1, 1)
    M = random_m(granularity, diagonal, batch, channels, 9, out_hw, gen).requires_grad_()

    def op(x, weight, M, bias):
        return bilinear_conv2d(
            x, weight, M, bias, stride=2, padding=1, granularity=granularity, diagonal=diagonal
        )

    assert torch.autograd.gradcheck(op, (x, weight, M, bias))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("diagonal", [False, True])
def test_gradgradcheck_torch_path(granularity, diagonal, monkeypatch):
    """Second-order MAML differentiates through the backward pass: check it too."""
    monkeypatch.setenv(BACKEND_ENV, "torch")
    gen = torch.Generator().manual_seed(4)
    # Tiny on purpose: gradgradcheck's cost grows with (inputs x outputs).
    x = torch.randn(2, 2, 3, 3, dtype=DTYPE, generator=gen, requires_grad=True)
    weight = torch.randn(2, 2, 2, 2, dtype=DTYPE, generator=gen, requires_grad=True)
    M = random_m(granularity, diagonal, 2, 2, 4, (2, 2), gen).requires_grad_()

    def op(x, weight, M):
        return bilinear_conv2d(x, weight, M, granularity=granularity, diagonal=diagonal)

    assert torch.autograd.gradgradcheck(op, (x, weight, M))


SAMPLE_PATHS = {
    "unfold": torch_paths._sample_unfold_torch,
    "grouped": torch_paths._sample_grouped_torch,
}


@pytest.mark.parametrize("path", sorted(SAMPLE_PATHS))
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
def test_every_sample_path_matches_reference(path, diagonal, geometry):
    """Both per-sample formulations are exact on every geometry, whichever the chooser picks."""
    channels, out_ch, kernel, stride, padding, dilation, batch = geometry
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(batch, channels, 9, 8, dtype=DTYPE, generator=gen)
    weight = torch.randn(out_ch, channels, kh, kw, dtype=DTYPE, generator=gen)
    geom = canonical_geometry((kh, kw), stride, padding, dilation)
    M = random_m("sample", diagonal, batch, channels, kh * kw, (1, 1), gen)
    expected = bilinear_conv2d_reference(x, weight, M, geom, "sample", diagonal)
    out = SAMPLE_PATHS[path](x, weight, M, geom, diagonal)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("diagonal", [False, True])
def test_sample_chooser_takes_unfold_on_small_maps(diagonal, monkeypatch):
    """Output maps with no more locations than filters go to the unfold path (and stay exact)."""
    assert torch_paths._sample_prefers_unfold(32, (4, 4))
    assert not torch_paths._sample_prefers_unfold(32, (8, 8))
    calls = []
    real = torch_paths._sample_unfold_torch
    monkeypatch.setattr(
        torch_paths,
        "_sample_unfold_torch",
        lambda *args: calls.append(args[1].shape) or real(*args),
    )
    monkeypatch.setenv(BACKEND_ENV, "torch")
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 4, 4, dtype=DTYPE, generator=gen)
    weight = torch.randn(20, 4, 3, 3, dtype=DTYPE, generator=gen)
    bias = torch.randn(20, dtype=DTYPE, generator=gen)
    M = random_m("sample", diagonal, 3, 4, 9, (4, 4), gen)
    out = bilinear_conv2d(x, weight, M, bias, 1, 1, granularity="sample", diagonal=diagonal)
    assert calls == [weight.shape]
    geometry = ConvGeometry((1, 1), (1, 1), (1, 1))
    expected = bilinear_conv2d_reference(x, weight, M, geometry, "sample", diagonal)
    torch.testing.assert_close(out, expected + bias.view(1, -1, 1, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", sorted(SAMPLE_PATHS))
@pytest.mark.parametrize("diagonal", [False, True])
def test_sample_paths_gradcheck_and_gradgradcheck(path, diagonal):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 3, 3, dtype=DTYPE, generator=gen, requires_grad=True)
    weight = torch.randn(2, 2, 2, 2, dtype=DTYPE, generator=gen, requires_grad=True)
    M = random_m("sample", diagonal, 2, 2, 4, (2, 2), gen).requires_grad_()

    def op(x, weight, M):
        return SAMPLE_PATHS[path](x, weight, M, ConvGeometry((1, 1), (0, 0), (1, 1)), diagonal)

    assert torch.autograd.gradcheck(op, (x, weight, M))
    assert torch.autograd.gradgradcheck(op, (x, weight, M))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_identity_reproduces_conv2d(granularity):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 7, 7, dtype=DTYPE, generator=gen)
    weight = torch.randn(5, 4, 3, 3, dtype=DTYPE, generator=gen)
    bias = torch.randn(5, dtype=DTYPE, generator=gen)
    expected = F.conv2d(x, weight, bias, 1, 1, 2)
    out_hw = tuple(expected.shape[2:])
    for diagonal in (False, True):
        shape = expected_m_shape(granularity, diagonal, 3, 4, 9, out_hw)
        eye = (
            torch.ones(shape, dtype=DTYPE) if diagonal else torch.eye(9, dtype=DTYPE).expand(shape)
        )
        out = bilinear_conv2d(
            x, weight, eye, bias, 1, 1, 2, granularity=granularity, diagonal=diagonal
        )
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bilinear_conv2d(x, weight, None, bias, 1, 1, 2), expected)


def test_same_and_valid_padding_strings():
    x = torch.randn(2, 3, 6, 6, dtype=DTYPE)
    weight = torch.randn(4, 3, 3, 3, dtype=DTYPE)
    M = torch.randn(2, 6, 6, 9, dtype=DTYPE)
    out = bilinear_conv2d(x, weight, M, padding="same", granularity="location", diagonal=True)
    assert out.shape == (2, 4, 6, 6)
    torch.testing.assert_close(
        bilinear_conv2d(x, weight, None, padding="valid"), F.conv2d(x, weight)
    )
    with pytest.raises(ValueError, match="stride 1"):
        bilinear_conv2d(x, weight, None, stride=2, padding="same")


@pytest.mark.parametrize(
    ("granularity", "diagonal", "bad_shape", "expected"),
    [
        ("shared", False, (9,), "(HV, HV) = (9, 9)"),
        ("channel", True, (9,), "(C, HV) = (3, 9)"),
        ("sample", False, (4, 9), "(B, HV, HV) = (4, 9, 9)"),
        ("location", True, (4, 3, 3, 9), "(B, H_out, W_out, HV) = (4, 5, 5, 9)"),
    ],
)
def test_bad_m_shape_names_expected_shape(granularity, diagonal, bad_shape, expected):
    x = torch.randn(4, 3, 5, 5)
    weight = torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match=f"granularity='{granularity}'") as info:
        bilinear_conv2d(
            x,
            weight,
            torch.randn(bad_shape),
            padding=1,
            granularity=granularity,
            diagonal=diagonal,
        )
    assert expected in str(info.value)
    assert f"got {bad_shape}" in str(info.value)


def test_other_bad_arguments():
    x = torch.randn(2, 3, 5, 5)
    weight = torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match="C = 3"):
        bilinear_conv2d(x, torch.randn(2, 4, 3, 3), None)
    with pytest.raises(ValueError, match="granularity must be one of"):
        bilinear_conv2d(x, weight, torch.randn(9, 9), granularity="pixel")
    with pytest.raises(ValueError, match="bias must have shape"):
        bilinear_conv2d(x, weight, None, torch.randn(3))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        bilinear_conv2d(x, weight, None, stride=0)
    with pytest.raises(ValueError, match="too small"):
        bilinear_conv2d(x, torch.randn(2, 3, 7, 7), None)
    with pytest.raises(ValueError, match="dtype"):
        bilinear_conv2d(x, weight, torch.randn(9, 9, dtype=torch.float64))


def test_backend_selection_and_env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert backend("cpu") == "torch"
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert backend("cpu") == "reference"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert backend("cpu") == "torch"
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        backend("cpu")


def test_forced_cuda_without_gpu_falls_back_once(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    monkeypatch.setattr(bilinear_module, "_warned_fallbacks", set())
    with pytest.warns(RuntimeWarning, match="torch path"):
        assert backend("cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend("cpu") == "torch"  # second time: no warning
        x = torch.randn(2, 3, 5, 5, dtype=DTYPE)
        weight = torch.randn(2, 3, 3, 3, dtype=DTYPE)
        M = torch.randn(2, 9, dtype=DTYPE)
        out = bilinear_conv2d(x, weight, M, granularity="sample", diagonal=True)
    geometry = ConvGeometry((1, 1), (0, 0), (1, 1))
    expected = bilinear_conv2d_reference(x, weight, M, geometry, "sample", True)
    torch.testing.assert_close(out, expected)


def test_dispatcher_uses_cuda_module_when_usable(monkeypatch):
    """With a usable extension, auto sends per-sample/location CUDA inputs to it (mocked)."""
    calls = []

    def fake_custom_op(x, weight, M, geometry, granularity, diagonal):
        calls.append((*geometry, granularity, diagonal))
        return bilinear_conv2d_reference(x, weight, M, geometry, granularity, diagonal)

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(bilinear_module, "_cuda_usable", lambda: True)
    monkeypatch.setattr(bilinear_module, "bilinear_conv2d_custom_op", fake_custom_op)
    assert backend("cuda") == "cuda"
    assert backend("cpu") == "torch"
    monkeypatch.setattr(bilinear_module, "backend", lambda device, granularity: "cuda")
    x = torch.randn(2, 3, 6, 6, dtype=DTYPE)
    weight = torch.randn(2, 3, 3, 3, dtype=DTYPE)
    bias = torch.randn(2, dtype=DTYPE)
    M = torch.randn(2, 9, 9, dtype=DTYPE)
    out = bilinear_conv2d(x, weight, M, bias, 2, "valid", granularity="sample")
    assert calls == [((2, 2), (0, 0), (1, 1), "sample", False)]
    geometry = ConvGeometry((2, 2), (0, 0), (1, 1))
    expected = bilinear_conv2d_reference(x, weight, M, geometry, "sample", False)
    torch.testing.assert_close(out, expected + bias.view(1, -1, 1, 1))


def test_output_size_matches_conv2d():
    x = torch.randn(1, 1, 11, 9)
    for kernel, stride, padding, dilation in [((3, 3), 2, 1, 1), ((5, 3), (1, 2), (2, 0), (1, 3))]:
        expected = F.conv2d(x, torch.randn(1, 1, *kernel), None, stride, padding, dilation)
        assert output_size((11, 9), kernel, stride, padding, dilation) == tuple(expected.shape[2:])
