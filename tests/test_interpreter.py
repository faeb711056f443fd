"""The Triton kernels on CPU tensors outside pytest: each case runs in a fresh `python -c` process, so nothing that
conftest.py or another test set up in this process (TRITON_INTERPRET, patches to Triton) can help it.

With TRITON_INTERPRET=1 the kernels must run as they do in the tests (kernels/_common.py applies the interpreter
fix on import); without it, picking "triton" for CPU tensors must give every op the same clear error."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


INTERPRETED = """
import torch
from stablelm import ops

torch.manual_seed(0)
B, Hq, Hkv, D, half = 2, 4, 2, 64, 8
# Prefill attention with left padding (kv_start is a runtime loop bound: the NumPy >= 2.4 case).
q, k, v = torch.randn(B, Hq, 37, D), torch.randn(B, Hkv, 37, D), torch.randn(B, Hkv, 37, D)
kv_start = torch.tensor([0, 5], dtype=torch.int32)
args = dict(kv_start=kv_start)
want = ops.implementation("attention", "torch")(q, k, v, **args)
got = ops.implementation("attention", "triton")(q, k, v, **args)
torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
# Decode attention over a cache with different lengths per sequence.
q1, k_cache, v_cache = torch.randn(B, Hq, D), torch.randn(B, Hkv, 70, D), torch.randn(B, Hkv, 70, D)
kv_len = torch.tensor([70, 41], dtype=torch.int32)
want = ops.implementation("decode_attention", "torch")(q1, k_cache, v_cache, kv_len, kv_start=kv_start)
got = ops.implementation("decode_attention", "triton")(q1, k_cache, v_cache, kv_len, kv_start=kv_start)
torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
# Rotary fused with the cache write.
S = 3
angle = torch.rand(B, S, half) * 6.3
qs, ks, vs = torch.randn(B, S, Hq, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
write_pos = torch.tensor([4, 9], dtype=torch.int32)
out = {}
for impl in ("torch", "triton"):
    caches = torch.zeros(B, Hkv, 16, D), torch.zeros(B, Hkv, 16, D)
    q_out = ops.implementation("rotary_cache", impl)(qs.clone(), ks, vs, angle.cos(), angle.sin(), *caches, write_pos)
    out[impl] = (q_out, *caches)
for got, want in zip(out["triton"], out["torch"]):
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
# The decode GEMV behind ops.linear (one row).
x1, w1, b1 = torch.randn(1, 1, 96), torch.randn(37, 96), torch.randn(37)
torch.testing.assert_close(ops.implementation("linear", "triton")(x1, w1, b1), torch.nn.functional.linear(x1, w1, b1),
                           atol=2e-5, rtol=1e-4)
print("interpreted kernels match")
"""


def test_triton_kernels_run_in_the_interpreter_outside_pytest():
    result = run_python(INTERPRETED, interpret=True)
    assert result.returncode == 0, result.stderr
    assert "interpreted kernels match" in result.stdout


WITHOUT_INTERPRETER = """
import torch
from kernels.nf4 import quantize_nf4
from kernels.quant import quantize_weight
from stablelm import ops

B, S, H, D, half = 1, 2, 2, 16, 4
x, w, b = torch.randn(B, S, 32), torch.ones(32), torch.zeros(32)
q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, H, D), torch.randn(B, S, H, D)
cos, sin = torch.ones(B, S, half), torch.zeros(B, S, half)
cache = torch.zeros(B, H, 8, D)
pos = torch.zeros(B, dtype=torch.int32)
qw, scales, zeros = quantize_weight(torch.randn(8, 32), 8)
nf4 = quantize_nf4(torch.randn(8, 64), 64)
lin_w, labels = torch.randn(8, 32), torch.tensor([1, 3])
calls = {
    "rotary": lambda: ops.rotary(q, k, cos, sin),
    "rotary_cache": lambda: ops.rotary_cache(q, k, v, cos, sin, cache, cache.clone(), pos),
    "attention": lambda: ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
    "decode_attention": lambda: ops.decode_attention(q[:, 0], cache, cache, pos + 1),
    "layer_norm": lambda: ops.layer_norm(x, w, b, 1e-5),
    "swiglu": lambda: ops.swiglu(x, x),
    "quant_linear": lambda: ops.quant_linear(x, qw, scales, zeros, None, 8, 128),
    "swiglu_fused": lambda: ops.swiglu_fused(x),
    "nf4_linear": lambda: ops.nf4_linear(torch.randn(B, S, 64), *nf4, None, 64),
    "linear_cross_entropy": lambda: ops.linear_cross_entropy(x[0], lin_w, labels),
    "linear": lambda: ops.linear(x[:, :1], lin_w),
    "adamw_master": lambda: ops.adamw_master(w.bfloat16(), w.bfloat16(), w.clone(), b.clone(), b.clone(), 1e-3, 0.9,
                                             0.999, 1e-8, 0.0, 1),
}
assert sorted(calls) == sorted(ops.CUDA_PREFERENCE)
for op, call in calls.items():
    with ops.using(**{op: "torch"}):
        call()  # the arguments are valid: only the implementation choice fails below
    with ops.using(**{op: "triton"}):
        try:
            call()
        except RuntimeError as e:
            want = f"op {op!r}: implementation 'triton' needs CUDA tensors or TRITON_INTERPRET=1"
            assert str(e).startswith(want), str(e)
            assert f"ops.use({op}='torch')" in str(e), str(e)
        else:
            raise AssertionError(f"{op}: triton on CPU tensors without the interpreter did not raise")
print("one error for every op")
"""


def test_triton_on_cpu_without_interpreter_is_one_clear_error():
    result = run_python(WITHOUT_INTERPRETER, interpret=False)
    assert result.returncode == 0, result.stderr
    assert "one error for every op" in result.stdout
