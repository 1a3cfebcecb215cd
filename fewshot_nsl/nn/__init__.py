"""NSL layers: static ``NSLConv2d``, dynamic ``DynamicNSLConv2d``, the conv factory, folding."""

from fewshot_nsl.nn.dynamic import AdaptedPredictor, DynamicNSLConv2d, SimilarityPredictor
from fewshot_nsl.nn.factory import ConvFactory, ConvSpec
from fewshot_nsl.nn.functional import patch_norm
from fewshot_nsl.nn.static import NSLConv2d, fold_model, similarity_penalty

__all__ = [
    "AdaptedPredictor",
    "ConvFactory",
    "ConvSpec",
    "DynamicNSLConv2d",
    "NSLConv2d",
    "SimilarityPredictor",
    "fold_model",
    "patch_norm",
    "similarity_penalty",
]
