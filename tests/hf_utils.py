"""Helpers for tests: build random-weight transformers StableLM checkpoints on disk."""
import torch
from transformers import StableLmConfig, StableLmForCausalLM

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
