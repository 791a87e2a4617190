"""PyTorch reference of TerraMind 1.0's FSQ-VAE tokenizers, written for ONNX/TensorRT export.

Module names are the keys of the official ``TerraMind_Tokenizer_<MOD>.pt`` state_dicts.
"""
from .config import TOKENIZER_CONFIGS, TokenizerConfig, UNetConfig, ViTConfig, tokenizer_config
from .fsq import FiniteScalarQuantizer
from .model import (
    ClassMapEncoder,
    LulcDecoder,
    Tokenizer,
    TokenizerEncoder,
    TokenizerLoadError,
    UNetStep,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "TOKENIZER_CONFIGS",
    "ClassMapEncoder",
    "FiniteScalarQuantizer",
    "LulcDecoder",
    "Tokenizer",
    "TokenizerConfig",
    "TokenizerEncoder",
    "TokenizerLoadError",
    "UNetConfig",
    "UNetStep",
    "ViTConfig",
    "build_tokenizer",
    "load_tokenizer",
    "tokenizer_config",
]
