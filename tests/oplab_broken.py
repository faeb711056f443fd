"""Deliberately broken implementations for tests/test_oplab.py: each has the op's signature and one classic bug,
which check-op must catch and name by case."""
import torch

from kernels.attention import attention_ref
from kernels.mlp import swiglu_ref
from kernels.rotary import rotary_cache_ref, rotary_ref


def rotary_wrong_sign(q, k, cos, sin):
    """Rotates the wrong way (sin negated)."""
    return rotary_ref(q, k, cos, -sin)


def rotary_off_by_one(q, k, cos, sin):
    """Uses each token's neighbour's angle (the table shifted by one position)."""
    return rotary_ref(q, k, cos.roll(1, dims=1), sin.roll(1, dims=1))


def rotary_cache_off_by_one(q, k, v, cos, sin, k_cache, v_cache, write_pos):
    """Writes k and v one cache slot too far."""
    return rotary_cache_ref(q, k, v, cos, sin, k_cache[:, :, 1:], v_cache[:, :, 1:], write_pos)


def attention_wrong_gqa(q, k, v, kv_start=None, causal=True, scale=None):
    """Query head h reads kv head h % Hkv (tiled) instead of h // (Hq / Hkv) (interleaved)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat(1, rep, 1, 1)
    v = v.repeat(1, rep, 1, 1)
    return attention_ref(q, k, v, kv_start=kv_start, causal=causal, scale=scale)


def swiglu_upcast(gate, up):
    """Right values, silently returned in float32 whatever the input dtype."""
    return swiglu_ref(gate.float(), up.float())


def rotary_swapped_args(q, k, sin, cos):
    """Wrong signature: sin and cos swapped."""
    return rotary_ref(q, k, cos, sin)


def swiglu_raises(gate, up):
    raise RuntimeError("kernel exploded")


_calls = {"swiglu_faults_on_its_second_case": 0}


def swiglu_faults_on_its_second_case(gate, up):
    """Right on its first call; then raises what a kernel's illegal address raises (the CUDA context is lost)."""
    _calls["swiglu_faults_on_its_second_case"] += 1
    if _calls["swiglu_faults_on_its_second_case"] > 1:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    return swiglu_ref(gate, up)


NOT_CALLABLE = 3
