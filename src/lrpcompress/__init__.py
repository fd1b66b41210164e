"""lrpcompress: compress trained PyTorch models with Layer-wise Relevance Propagation."""

from .errors import FormatError, LrpcError
from .relevance import Relevance, RelevanceConfig, compute_relevance

__version__ = "0.1.0"
__all__ = ["LrpcError", "FormatError", "Relevance", "RelevanceConfig", "compute_relevance", "__version__"]
