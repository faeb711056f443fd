"""Helpers for tests: build random-weight transformers StableLM checkpoints on disk."""
import torch
from safetensors.torch import save_file
from transformers import StableLmConfig, StableLmForCausalLM

from stablelm.config import StableLMConfig
from stablelm.convert import hf_shapes

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)


def hf_model(seed=0, **overrides):
    """A StableLmForCausalLM (eager attention, fp32, eval) with random weights, LayerNorms perturbed from 1/0."""
    torch.manual_seed(seed)
    config = StableLmConfig(**{**BASE, **overrides})
    model = StableLmForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "layernorm" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.08)
    model.config._attn_implementation = "eager"
    return model


def save_random_hf_checkpoint(path, **overrides):
    """A transformers-layout checkpoint dir (config.json + model.safetensors) with random fp32 tensors, written
    without building a model: fast even for many or large tensors."""
    config = StableLmConfig(**{**BASE, **overrides})
    config.save_pretrained(path)
    shapes = hf_shapes(StableLMConfig.from_hf(config.to_dict()))
    save_file({name: torch.randn(shape) * 0.05 for name, shape in shapes.items()}, str(path / "model.safetensors"))
    return path
