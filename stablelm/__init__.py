"""stablelm: a from-scratch PyTorch + Triton StableLM decoder, its classification heads and their I/O.

    import stablelm
    model = stablelm.load("converted_dir", device="cuda", dtype="bf16")   # the class config.architectures names
"""
from .cache import KVCache
from .checkpoint import load
from .config import PRESETS, StableLMConfig, preset
from .model import StableLM, StableLMForSequenceClassification, StableLMForTokenClassification, StableLMModel
from .tokenizer import Tokenizer

__all__ = ["KVCache", "PRESETS", "StableLM", "StableLMConfig", "StableLMForSequenceClassification",
           "StableLMForTokenClassification", "StableLMModel", "Tokenizer", "load", "preset"]
