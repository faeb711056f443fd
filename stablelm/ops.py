"""The op table: the model calls these functions, never a kernel directly.

Every op has named implementations with one signature and one tensor layout (documented once, in the kernels
module that holds the op's reference):

  rotary(q, k, cos, sin) -> (q, k)                         kernels/rotary.py
  rotary_cache(q, k, v, cos, sin, k_cache, v_cache, write_pos) -> q   kernels/rotary.py
  attention(q, k, v, kv_start=None, causal=True, scale=None) kernels/attention.py
  decode_attention(q, k_cache, v_cache, kv_len, kv_start=None, scale=None)   kernels/decode.py
  layer_norm(x, weight, bias, eps, residual=None)          kernels/norm.py
  swiglu(gate, up)                                         kernels/mlp.py
  swiglu_fused(gate_up)   (gate_up = [gate | up] on the last dim)   kernels/mlp.py
  quant_linear(x, qweight, scales, zeros, bias, bits, group_size)   kernels/quant.py
  nf4_linear(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size)   kernels/nf4.py
  linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100)   kernels/loss.py
  linear(x, weight, bias=None)   (F.linear; the model's Linear layers)   kernels/gemv.py
  adamw_master(param, grad, master, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)
      (in place; the optimizer's, not the model's: stablelm/optim.py)   kernels/adamw.py

"torch" is the pure-PyTorch reference and runs anywhere. Swap without touching the model:

    import stablelm.ops as ops
    ops.use(attention="torch", rotary="triton")     # pick per op (None goes back to the default)
    ops.register("attention", "mine", my_fn)        # add an implementation with the same signature
    with ops.using(attention="sdpa"): ...           # scoped choice
    ops.use(pdl=False)                              # launch without programmatic dependent launch

pdl (on by default; STABLELM_PDL=0 in the environment turns the default off) is how the
"triton" kernels of a decode step are launched, not an implementation: on Hopper and later GPUs each may start
while the kernel before it still runs, and waits on the device for that kernel's output (kernels/_common.py has the
rule every such kernel keeps). The arithmetic is the same either way (tests/test_pdl.py's GPU tests compare the
bits).

Defaults: on CUDA the first available name in CUDA_PREFERENCE, on the CPU "torch". A "triton" implementation
picked for CPU tensors runs in Triton's interpreter when TRITON_INTERPRET=1 was set before the kernels were
imported; without it every op raises the same RuntimeError saying so (rather than each kernel failing its own way).
"""
import contextlib

# Imported as kernels.<name>: the ops below reuse the names rotary and attention.
import kernels.adamw
import kernels.attention
import kernels.decode
import kernels.gemv
import kernels.loss
import kernels.mlp
import kernels.nf4
import kernels.norm
import kernels.quant
import kernels.rotary
from kernels._common import INTERPRET, pdl_on, set_pdl

_KERNEL_MODULES = (kernels.rotary, kernels.attention, kernels.decode, kernels.norm, kernels.mlp, kernels.quant,
                   kernels.nf4, kernels.loss, kernels.gemv, kernels.adamw)

# Preferred implementation first, from the measurements in bench/results/ (README, "Swapping kernels", says why).
CUDA_PREFERENCE = {
    "rotary": ["triton", "torch"],
    "rotary_cache": ["triton", "torch"],
    "attention": ["triton", "sdpa", "torch"],
    "decode_attention": ["triton", "torch"],
    "layer_norm": ["triton", "torch"],
    "swiglu": ["triton", "torch"],
    "swiglu_fused": ["triton", "torch"],
    "quant_linear": ["triton", "torch"],
    "nf4_linear": ["triton", "torch"],
    "linear_cross_entropy": ["triton", "chunked", "torch"],
    "linear": ["triton", "torch"],
    "adamw_master": ["triton", "torch"],
}

_registry: dict[str, dict] = {}
_chosen: dict[str, str | None] = {}


def register(op: str, name: str, fn) -> None:
    """Add (or replace) implementation `name` of `op`."""
    if op not in CUDA_PREFERENCE:
        raise KeyError(f"unknown op {op!r}; ops are {sorted(CUDA_PREFERENCE)}")
    _registry.setdefault(op, {})[name] = fn


def available(op: str) -> list[str]:
    """Names registered for `op`."""
    return sorted(_registry.get(op, {}))


def use(**choices) -> None:
    """Pick an implementation per op, e.g. use(attention="sdpa"); None restores the device default. `pdl`
    (True / False / None for the default) switches programmatic dependent launch (module docstring)."""
    choices = dict(choices)
    switch_pdl = "pdl" in choices
    pdl_choice = choices.pop("pdl", None)
    if pdl_choice is not None and not isinstance(pdl_choice, bool):
        raise TypeError(f"use(pdl=...) takes True, False or None, got {pdl_choice!r}")
    for op, name in choices.items():
        if op not in CUDA_PREFERENCE:
            raise KeyError(f"unknown op {op!r}; ops are {sorted(CUDA_PREFERENCE)}")
        if name is not None and name not in _registry.get(op, {}):
            raise KeyError(f"op {op!r} has no implementation {name!r}; available: {available(op)}")
    _chosen.update(choices)
    if switch_pdl:
        set_pdl(pdl_choice)


def pdl() -> bool:
    """Whether kernels launch with programmatic dependent launch where the GPU has it (ops.use(pdl=...))."""
    return pdl_on()


@contextlib.contextmanager
def using(**choices):
    """Context-manager form of use(); restores the previous choices on exit."""
    before = {op: _chosen.get(op) for op in choices if op != "pdl"}
    pdl_before = pdl_on()
    use(**choices)
    try:
        yield
    finally:
        _chosen.update(before)
        set_pdl(pdl_before)


def current(op: str, device_type: str) -> str:
    """The implementation name `op` uses for tensors on `device_type`."""
    name = _chosen.get(op)
    if name is not None:
        return name
    if device_type == "cuda":
        impls = _registry.get(op, {})
        return next(n for n in CUDA_PREFERENCE[op] if n in impls)
    return "torch"


def implementation(op: str, name: str):
    """Implementation `name` of `op`, to call directly (bypassing the current choice)."""
    if name not in _registry.get(op, {}):
        raise KeyError(f"op {op!r} has no implementation {name!r}; available: {available(op)}")
    return _registry[op][name]


def get(op: str, device_type: str):
    """The function `op` dispatches to for tensors on `device_type`."""
    name = current(op, device_type)
    if name == "triton" and device_type != "cuda" and not INTERPRET:
        raise RuntimeError(f"op {op!r}: implementation 'triton' needs CUDA tensors or TRITON_INTERPRET=1 (set before "
                           f"kernels are imported) to run on {device_type} tensors; or pick another implementation, "
                           f"e.g. ops.use({op}='torch')")
    return _registry[op][name]


def rotary(q, k, cos, sin):
    return get("rotary", q.device.type)(q, k, cos, sin)


def rotary_cache(q, k, v, cos, sin, k_cache, v_cache, write_pos):
    return get("rotary_cache", q.device.type)(q, k, v, cos, sin, k_cache, v_cache, write_pos)


def attention(q, k, v, kv_start=None, causal=True, scale=None):
    return get("attention", q.device.type)(q, k, v, kv_start=kv_start, causal=causal, scale=scale)


def decode_attention(q, k_cache, v_cache, kv_len, kv_start=None, scale=None):
    return get("decode_attention", q.device.type)(q, k_cache, v_cache, kv_len, kv_start=kv_start, scale=scale)


def layer_norm(x, weight, bias, eps, residual=None):
    return get("layer_norm", x.device.type)(x, weight, bias, eps, residual=residual)


def swiglu(gate, up):
    return get("swiglu", gate.device.type)(gate, up)


def swiglu_fused(gate_up):
    # The model calls this op; a researcher's explicit swiglu choice (with none made for swiglu_fused) still
    # reaches the model, through the two halves.
    if _chosen.get("swiglu") is not None and _chosen.get("swiglu_fused") is None:
        return swiglu(*gate_up.chunk(2, dim=-1))
    return get("swiglu_fused", gate_up.device.type)(gate_up)


def quant_linear(x, qweight, scales, zeros, bias, bits, group_size):
    return get("quant_linear", x.device.type)(x, qweight, scales, zeros, bias, bits, group_size)


def nf4_linear(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size):
    return get("nf4_linear", x.device.type)(x, qweight, absmax, absmax_scale, absmax_mean, bias, block_size)


def linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100):
    return get("linear_cross_entropy", hidden.device.type)(hidden, weight, labels, bias, ignore_index)


def linear(x, weight, bias=None):
    return get("linear", x.device.type)(x, weight, bias)


def adamw_master(param, grad, master, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    return get("adamw_master", param.device.type)(param, grad, master, exp_avg, exp_avg_sq, lr, beta1, beta2, eps,
                                                   weight_decay, step)


def _register_kernels():
    for module in _KERNEL_MODULES:
        for op, impls in module.IMPLEMENTATIONS.items():
            for name, fn in impls.items():
                register(op, name, fn)


_register_kernels()
