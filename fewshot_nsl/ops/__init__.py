"""Functional ops: the bilinear (neural-similarity) convolution and its dispatch.

Layout (one job per module, each imports only those above it in this list):

* ``geometry``: :class:`ConvGeometry`, granularities, output size, ``M`` shapes, ``validate``;
* ``torch_paths``: the reference path, the fast torch paths and the explicit backward;
* ``extension``: building/loading the C++/CUDA extension in ``csrc/``;
* ``custom_op``: the ``fewshot_nsl::bilinear_conv2d`` custom op (CPU: torch paths, CUDA:
  the extension);
* ``bilinear``: :func:`bilinear_conv2d`, the dispatcher, and :func:`backend`.
"""

from fewshot_nsl.ops.bilinear import BACKEND_ENV, backend, bilinear_conv2d
from fewshot_nsl.ops.geometry import (
    GRANULARITIES,
    ConvGeometry,
    Granularity,
    IntPair,
    Padding,
    canonical_geometry,
    expected_m_shape,
    output_size,
    to_pair,
)
from fewshot_nsl.ops.torch_paths import (
    bilinear_conv2d_reference,
    bilinear_conv2d_torch,
    effective_weight,
)

__all__ = [
    "BACKEND_ENV",
    "GRANULARITIES",
    "ConvGeometry",
    "Granularity",
    "IntPair",
    "Padding",
    "backend",
    "bilinear_conv2d",
    "bilinear_conv2d_reference",
    "bilinear_conv2d_torch",
    "canonical_geometry",
    "effective_weight",
    "expected_m_shape",
    "output_size",
    "to_pair",
]
