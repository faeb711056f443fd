"""Partial rotary position embedding (rotate-half convention) on the first rotary_dim dims of each head.

Layout: q [B, S, Hq, D], k [B, S, Hkv, D] (views of the fused QKV projection are fine: any strides),
cos/sin [B, S, R/2] float32 where R = rotary_dim <= D, R even. Dims R..D pass through unchanged.
"""
import torch


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Reference: returns new (q, k) with the first 2*cos.shape[-1] dims rotated; math in float32."""
    def rot(x):
        half = cos.shape[-1]
        c = cos[:, :, None, :]
        s = sin[:, :, None, :]
        x1 = x[..., :half].float()
        x2 = x[..., half:2 * half].float()
        out = x.clone()
        out[..., :half] = (x1 * c - x2 * s).to(x.dtype)
        out[..., half:2 * half] = (x2 * c + x1 * s).to(x.dtype)
        return out

    return rot(q), rot(k)


IMPLEMENTATIONS = {"rotary": {"torch": rotary_ref}}
