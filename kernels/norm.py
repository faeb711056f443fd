"""LayerNorm with bias, optionally fused with the residual add, optionally per head.

x [..., N]; weight, bias [N] (bias may be None), or [H, N] for a per-head LayerNorm on x [..., H, N].
With residual given, returns (layer_norm(x + residual), x + residual) so the sum is made once.
"""
import torch
import torch.nn.functional as F


def layer_norm_ref(x, weight, bias, eps, residual=None):
    """Reference: float32 math, output in x's dtype."""
    s = x if residual is None else x + residual
    y = F.layer_norm(s.float(), (s.shape[-1],), eps=eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, s)


IMPLEMENTATIONS = {"layer_norm": {"torch": layer_norm_ref}}
