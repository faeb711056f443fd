"""LoRA (low-rank adapters) for nn.Linear layers, written here so it works on any module tree of ours.

`apply_lora(module, targets, r, alpha, dropout)` wraps every nn.Linear whose qualified name ends with one of
`targets`; a target may name output ranges, so a fused projection (our [q; k; v] `qkv`) can get adapters on q and
v only, like LoRA on separate q_proj / v_proj layers. The base weight is frozen; B starts at zero so a fresh
adapter leaves the model's output unchanged.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 out_ranges: list[tuple[int, int]] | None = None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.out_ranges = out_ranges or [(0, base.out_features)]
        for lo, hi in self.out_ranges:
            if not 0 <= lo < hi <= base.out_features:
                raise ValueError(f"LoRA output range {(lo, hi)} outside 0..{base.out_features}")
        covered = sum(hi - lo for lo, hi in self.out_ranges)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(covered, r, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self):
        return self.base.weight

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        out = self.base(x)
        h = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()
        delta = (h @ self.lora_B.t() * self.scale).to(out.dtype)
        if self.out_ranges == [(0, self.base.out_features)]:
            return out + delta
        pieces, at, col = [], 0, 0
        for lo, hi in self.out_ranges:
            if lo > at:
                pieces.append(torch.zeros_like(out[..., at:lo]))
            pieces.append(delta[..., col:col + hi - lo])
            col += hi - lo
            at = hi
        if at < self.base.out_features:
            pieces.append(torch.zeros_like(out[..., at:]))
        return out + torch.cat(pieces, dim=-1)


def apply_lora(module: nn.Module, targets: dict[str, list[tuple[int, int]] | None], r: int, alpha: float,
               dropout: float = 0.0) -> list[str]:
    """Wrap each nn.Linear whose name ends with a key of `targets` (value: output ranges or None for all).
    Returns the wrapped names; raises if a target matched nothing (a typo would otherwise train nothing)."""
    wrapped, hit = [], set()
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear):
            continue
        for suffix, ranges in targets.items():
            if name == suffix or name.endswith("." + suffix):
                parent_name, _, attr = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                setattr(parent, attr, LoRALinear(child, r, alpha, dropout, ranges))
                wrapped.append(name)
                hit.add(suffix)
                break
    missing = set(targets) - hit
    if missing:
        raise ValueError(f"LoRA targets matched no nn.Linear: {sorted(missing)}")
    return wrapped


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]
