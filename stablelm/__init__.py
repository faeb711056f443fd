"""stablelm: a from-scratch PyTorch + Triton StableLM decoder.

    import stablelm
    model = stablelm.load("converted_dir", device="cuda", dtype="bf16")
"""
from .cache import KVCache
from .checkpoint import load
from .config import PRESETS, StableLMConfig, preset
from .model import StableLM
from .tokenizer import Tokenizer

__all__ = ["KVCache", "PRESETS", "StableLM", "StableLMConfig", "Tokenizer", "load", "preset"]
