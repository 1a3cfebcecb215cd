"""Functional ops: the bilinear (neural-similarity) convolution and its dispatch."""

from fewshot_nsl.ops.bilinear import (
    BACKEND_ENV,
    GRANULARITIES,
    backend,
    bilinear_conv2d,
    bilinear_conv2d_reference,
    bilinear_conv2d_torch,
    canonical_geometry,
    effective_weight,
    expected_m_shape,
    output_size,
)

__all__ = [
    "BACKEND_ENV",
    "GRANULARITIES",
    "backend",
    "bilinear_conv2d",
    "bilinear_conv2d_reference",
    "bilinear_conv2d_torch",
    "canonical_geometry",
    "effective_weight",
    "expected_m_shape",
    "output_size",
]
