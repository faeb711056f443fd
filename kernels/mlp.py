"""SwiGLU activation: silu(gate) * up, the middle of StableLM's MLP (down(silu(gate(x)) * up(x)))."""
import torch
import torch.nn.functional as F


def swiglu_ref(gate, up):
    """Reference: float32 math, output in gate's dtype. gate and up have the same shape (views are fine)."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


IMPLEMENTATIONS = {"swiglu": {"torch": swiglu_ref}}
