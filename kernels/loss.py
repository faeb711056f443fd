"""Fused linear + cross-entropy over the vocabulary, in chunks of tokens: the LM head and the loss of training
without the [tokens, vocab] float32 logits (50304 x 4 bytes = 201 KB per token at StableLM's vocabulary) in memory.

Op (stablelm.ops.linear_cross_entropy):
  linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100) -> scalar float32
  hidden [T, H] (float32 / float16 / bfloat16), weight [V, H] and bias [V] in hidden's dtype, labels [T] int64 in
  [0, V) or ignore_index. Equals F.cross_entropy(F.linear(hidden, weight, bias).float(), labels,
  ignore_index=ignore_index): the mean over the labelled tokens (NaN when there are none, as torch gives), logits
  computed in hidden's dtype and the softmax in float32. Gradients flow to hidden, weight and bias (those that
  require grad).

Implementations:
  "torch"    the reference, exactly the expression above (the full logits in memory).
  "chunked"  torch.autograd.Function: the tokens go through in chunks of `chunk_rows(V)` rows; per chunk the logits
             [c, V] (hidden's dtype) are computed, reduced to the chunk's loss, and turned at once into their gradient
             (softmax - one-hot) / n_labelled, from which grad_hidden (= g @ W) and grad_weight (+= g^T @ h, in the
             weight's dtype: float32 inside each chunk's product, one rounding per chunk) are formed; the chunk's
             logits are then dropped. The gradients are thus computed in the forward (the Liger-Kernel recipe: the
             loss is the graph's end, so d loss only scales them) and backward multiplies them by the incoming
             scalar. Peak memory: one chunk's logits and one float32 buffer of them (shifted, exponentiated and
             normalised in place, the gradient written back over the logits) instead of all of them; no activation
             is saved for backward but the gradients themselves.
  "triton"   the same chunking with the per-chunk softmax / loss / gradient in one Triton kernel working in place on
             the chunk's logits (two passes over each row: an online max / sum of exponentials, then the gradient
             written over the logits in their dtype), so a chunk needs no float32 copy at all.
The count of labelled tokens is a device tensor (no host synchronisation); a chunk with no labelled token still
runs (skipping it would need one).

The gradient of a chunk is rounded to hidden's dtype before its matmuls, as autograd does in the reference
(logits.float()'s backward casts back), so the chunked paths round where the reference rounds; the differences are
the summation orders of the matmuls (tests/test_loss.py states the tolerances).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import contract as _c
from kernels._common import FLOAT_DTYPES

# Rows per chunk: about 2^24 logits (64 MB as float32), a power of two between 16 and 4096.
CHUNK_LOGITS = 1 << 24


def chunk_rows(vocab: int) -> int:
    rows = max(1, CHUNK_LOGITS // max(vocab, 1))
    return max(16, min(4096, 1 << (rows.bit_length() - 1)))


def _check_args(hidden, weight, labels, bias):
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"linear_cross_entropy: hidden dtype {hidden.dtype} is not supported (float32, float16, "
                        f"bfloat16)")
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden must be [T, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"linear_cross_entropy: weight / bias dtype must equal hidden's {hidden.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if labels.shape != (hidden.shape[0],) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels must be int64 [T={hidden.shape[0]}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"linear_cross_entropy: {name} is on {t.device} but hidden is on {hidden.device}")


def linear_cross_entropy_ref(hidden, weight, labels, bias=None, ignore_index=-100):
    """Reference: the full logits, F.cross_entropy in float32."""
    _check_args(hidden, weight, labels, bias)
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels.long(), ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------------------------
# Contract (kernels/contract.py): loss and the gradients of hidden, weight and bias

def _lce_inputs(case, seed, device):
    p = case.params
    T, H, V = p["T"], p["H"], p["V"]
    gen = _c.generator(case, seed)
    hidden = _c.randn(gen, T, H, dtype=case.dtype, device=device)
    weight = _c.randn(gen, V, H, dtype=case.dtype, device=device, scale=2 * H ** -0.5)
    bias = _c.randn(gen, V, dtype=case.dtype, device=device) if p.get("bias") else None
    labels = torch.randint(0, V, (T,), generator=gen).to(device)
    labels[::3] = -100
    return dict(hidden=hidden, weight=weight, labels=labels, bias=bias)


# 16-bit: the weight gradient is a sum over tokens rounded per chunk (atol relative to the largest gradient).
_LCE_TOL = {torch.float32: _c.Tol(1e-5, 1e-5), torch.float16: _c.Tol(2e-3, 4e-3, of_max=True),
            torch.bfloat16: _c.Tol(1e-2, 2e-2, of_max=True)}
_LCE_CPU = {"T37-H32-V300-bias-fp32-grad", "T300-H16-V1000-bf16-grad", "T5-H64-V50-fp16"}

CONTRACTS = {"linear_cross_entropy": _c.Contract(
    op="linear_cross_entropy", reference=None, make_inputs=_lce_inputs,
    cases=_c.make_cases([dict(T=37, H=32, V=300, bias=True), dict(T=300, H=16, V=1000), dict(T=5, H=64, V=50),
                         dict(T=1000, H=256, V=5000)], _c.FLOAT_DTYPES, grad=(False, True), cpu=_LCE_CPU),
    tol=_LCE_TOL, grad_tol=_LCE_TOL, grad_inputs=("hidden", "weight", "bias"),
    outputs=lambda loss, inputs: {"loss": loss.reshape(1)},  # a [1] view: the checks draw upstream grads by shape
    bench=[_c.Case("3b-report-800x50304", dict(T=800, H=2560, V=50304), torch.bfloat16)],
    work=lambda i: {"bytes": i["weight"].nbytes + 2 * i["hidden"].nbytes,
                    "flops": 6 * i["hidden"].shape[0] * i["weight"].numel()})}


# ----------------------------------------------------------------------------------------------------------------
# Per-chunk softmax / loss / gradient: (logits [c, V], labels [c], scale (device scalar)) ->
# (sum of the chunk's losses, float32 scalar; gradient [c, V] in logits' dtype or None)

def _chunk_ce_torch(logits, labels, scale, ignore_index, need_grad):
    # One float32 [c, V] buffer does all the work in place (shift, exp, softmax): torch.logsumexp and torch.exp
    # would each allocate one or two more, which is what the chunking is there to save.
    lf = logits.float()
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lf.sub_(lf.amax(dim=-1, keepdim=True))
    picked = lf.gather(1, target[:, None])[:, 0]
    sumexp = lf.exp_().sum(dim=-1)
    loss = ((sumexp.log() - picked) * valid).sum()
    if not need_grad:
        return loss, None
    grad = lf.div_(sumexp[:, None])  # softmax
    grad.scatter_add_(1, target[:, None], -torch.ones_like(grad[:, :1]))
    grad.mul_((valid * scale)[:, None])
    return loss, logits.copy_(grad)  # into the chunk's own logits, as the Triton path writes them


@triton.jit
def _chunk_ce_kernel(LOGITS, LABELS, LOSS, SCALE, V, stride, ignore_index,
                     NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row: LOSS[row] = lse - logit[label] (0 when ignored); with NEED_GRAD the row's logits are
    overwritten by (softmax - one-hot) * scale (0 when ignored)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    label = tl.load(LABELS + row).to(tl.int64)
    valid = label != ignore_index
    # Pass 1: online max and sum of exponentials (float32).
    # The running max starts finite, so lanes past V (loaded as -inf) add exp(-inf) = 0 and never form -inf - -inf.
    m = tl.full((BLOCK_V,), -1e38, dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
    lse = m_row + tl.log(s_row)
    safe = tl.where(valid, label, 0)
    picked = tl.load(base + safe).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - picked, 0.0))
    if NEED_GRAD:
        scale = tl.load(SCALE).to(tl.float32)
        scale = tl.where(valid, scale, 0.0)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            ok = offs < V
            x = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(offs == safe, 1.0, 0.0)
            tl.store(base + offs, (g * scale).to(LOGITS.dtype.element_ty), mask=ok)


def _chunk_ce_triton(logits, labels, scale, ignore_index, need_grad):
    c, V = logits.shape
    losses = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        block_v = min(4096, triton.next_power_of_2(V))
        _chunk_ce_kernel[(c,)](logits, labels, losses, scale, V, logits.stride(0), ignore_index,
                               NEED_GRAD=need_grad, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
    return losses.sum(), (logits if need_grad else None)


# ----------------------------------------------------------------------------------------------------------------
# Chunked autograd.Function

class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk, chunk_ce):
        T, H = hidden.shape
        V = weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_grad = need_h or need_w or need_b
        labels = labels.long()
        n_valid = (labels != ignore_index).sum()
        scale = 1.0 / n_valid.clamp(min=1).float()  # the gradient's 1/n (0 labels: zero gradients)
        grad_h = torch.empty_like(hidden) if need_h else None
        # The weight gradient accumulates in place in the weight's dtype (addmm: float32 inside each chunk's
        # product, one rounding per chunk): a float32 accumulator would cost more than the logits it saves.
        grad_w = torch.zeros(V, H, dtype=weight.dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, T, chunk):
            h = hidden[s:s + chunk]
            loss, g = chunk_ce(F.linear(h, weight, bias), labels[s:s + chunk], scale, ignore_index, need_grad)
            total += loss
            if need_h:
                torch.matmul(g, weight, out=grad_h[s:s + chunk])
            if need_w:
                grad_w.addmm_(g.t(), h)
            if need_b:
                grad_b += g.float().sum(0)
            del g  # before the next chunk's logits: one chunk's buffers alive at a time
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.has = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.has
        grad_h = next(saved) * grad_loss if need_h else None  # a 0-dim factor keeps grad_h's dtype
        grad_w = (next(saved) * grad_loss).to(ctx.dtypes[0]) if need_w else None
        grad_b = (next(saved) * grad_loss).to(ctx.dtypes[1]) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _chunked(chunk_ce):
    def linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, chunk=None):
        _check_args(hidden, weight, labels, bias)
        return _LinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index,
                                         chunk or chunk_rows(weight.shape[0]), chunk_ce)
    return linear_cross_entropy


linear_cross_entropy_chunked = _chunked(_chunk_ce_torch)
linear_cross_entropy_chunked.__doc__ = "Chunked fused linear + cross-entropy, per-chunk math in torch."
linear_cross_entropy_triton = _chunked(_chunk_ce_triton)
linear_cross_entropy_triton.__doc__ = "Chunked fused linear + cross-entropy, per-chunk math in one Triton kernel."


CONTRACTS["linear_cross_entropy"].reference = linear_cross_entropy_ref

IMPLEMENTATIONS = {"linear_cross_entropy": {"torch": linear_cross_entropy_ref,
                                            "chunked": linear_cross_entropy_chunked,
                                            "triton": linear_cross_entropy_triton}}
