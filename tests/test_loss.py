"""Fused linear + cross-entropy (kernels/loss.py): the chunked torch and Triton paths against
F.cross_entropy(F.linear(...).float()) with gradients, per dtype; nothing of [tokens, vocab] size is saved for
backward; the labelled-positions loss of StableLM (stablelm/model.py) against the full-logits loss."""
import pytest
import torch

from kernels.loss import (_chunk_ce_torch, _chunk_ce_triton, chunk_rows, linear_cross_entropy_chunked,
                          linear_cross_entropy_ref, linear_cross_entropy_triton)
from stablelm import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = {"chunked": linear_cross_entropy_chunked, "triton": linear_cross_entropy_triton}
# |out - ref| <= atol * max|ref| + rtol * |ref|, element by element. fp32: only summation orders differ. 16-bit:
# both sides round the logits and the logits' gradient to the dtype at the same places; the weight gradient is
# summed over chunks in place in the dtype here (one rounding per chunk) and in one 16-bit matmul output there,
# and grad_hidden is one 16-bit matmul per row on both sides.
LOSS_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
GRAD_TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1e-2, 2e-2)}


def _close(got, want, dtype, name):
    atol, rtol = GRAD_TOL[dtype]
    got, want = got.float(), want.float()
    bound = atol * want.abs().max() + rtol * want.abs()
    err = (got - want).abs()
    assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max().item():.3g}"


def _inputs(T, H, V, dtype, bias, seed, ignore_every=3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen).to(DEVICE, dtype)
    # Logits of a few units: a softmax that is neither flat nor one-hot.
    weight = (torch.randn(V, H, generator=gen) * 2 / H ** 0.5).to(DEVICE, dtype)
    b = torch.randn(V, generator=gen).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, V, (T,), generator=gen).to(DEVICE)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def _run(fn, hidden, weight, bias, labels, upstream=1.7, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = fn(leaves[0], leaves[1], labels, leaves[2] if bias is not None else None, **kw)
    (loss * upstream).backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,chunk,bias", [(37, 16, True), (37, 64, False), (50, 7, False)])
def test_matches_reference_with_grads(impl, dtype, T, chunk, bias):
    hidden, weight, b, labels = _inputs(T, 32, 300, dtype, bias, seed=T + chunk)
    want, want_grads = _run(linear_cross_entropy_ref, hidden, weight, b, labels)
    got, got_grads = _run(IMPLS[impl], hidden, weight, b, labels, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(got.item() - want.item()) <= LOSS_RTOL[dtype] * abs(want.item()), (got.item(), want.item())
    for name, g, w in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        _close(g, w, dtype, name)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_only_hidden_requires_grad_and_no_grad_mode(impl):
    hidden, weight, _, labels = _inputs(20, 16, 100, torch.float32, False, seed=3)
    h = hidden.clone().requires_grad_()
    loss = IMPLS[impl](h, weight, labels, chunk=8)
    loss.backward()
    h_ref = hidden.clone().requires_grad_()
    linear_cross_entropy_ref(h_ref, weight, labels).backward()
    _close(h.grad, h_ref.grad, torch.float32, "hidden")
    with torch.no_grad():
        assert torch.allclose(IMPLS[impl](hidden, weight, labels, chunk=8), loss.detach(), rtol=1e-6)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_no_labelled_token_gives_nan_like_torch(impl):
    hidden, weight, _, labels = _inputs(9, 16, 50, torch.float32, False, seed=4)
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    loss = IMPLS[impl](h, weight, labels, chunk=4)
    assert torch.isnan(loss) and torch.isnan(linear_cross_entropy_ref(hidden, weight, labels))
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h.grad))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_nothing_of_tokens_by_vocab_is_saved(impl):
    """The point of the op: the graph keeps no [T, V] logits (the reference keeps its float32 copy)."""
    T, H, V = 64, 16, 400
    hidden, weight, _, labels = _inputs(T, H, V, torch.float32, False, seed=5)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    for fn, kw in ((IMPLS[impl], dict(chunk=16)), (linear_cross_entropy_ref, {})):
        sizes.clear()
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(h, w, labels, **kw)
        if fn is linear_cross_entropy_ref:
            assert max(sizes) >= T * V  # the check can see a [T, V] tensor
        else:
            assert max(sizes) <= max(T * H, V * H), sizes


def test_triton_chunk_kernel_wide_vocab_and_extreme_logits():
    """Several BLOCK_V blocks per row (V = 5000 > 4096), a ragged last block, logits of +-100."""
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.float16):
        logits = (torch.randn(5, 5000, generator=gen) * 30).clamp(-100, 100).to(DEVICE, dtype)
        labels = torch.tensor([0, 4999, -100, 17, 2500], device=DEVICE)
        scale = torch.tensor(0.25, device=DEVICE)
        want_loss, want_grad = _chunk_ce_torch(logits.clone(), labels, scale, -100, True)
        got_loss, got_grad = _chunk_ce_triton(logits.clone(), labels, scale, -100, True)
        assert torch.allclose(got_loss, want_loss, rtol=1e-5), (got_loss, want_loss)
        assert torch.allclose(got_grad.float(), want_grad.float(), atol=1e-3 if dtype == torch.float16 else 1e-6)
        assert torch.equal(got_grad[2], torch.zeros_like(got_grad[2]))


def test_chunk_rows():
    assert chunk_rows(50304) == 256 and chunk_rows(10) == 4096 and chunk_rows(1 << 30) == 16


def test_argument_errors():
    hidden, weight, _, labels = _inputs(4, 8, 10, torch.float32, False, seed=7)
    with pytest.raises(ValueError, match="labels must be int64"):
        linear_cross_entropy_chunked(hidden, weight, labels[:3])
    with pytest.raises(TypeError, match="weight / bias dtype"):
        linear_cross_entropy_chunked(hidden, weight.half(), labels)
    with pytest.raises(ValueError, match=r"hidden must be \[T, H\]"):
        linear_cross_entropy_chunked(hidden[None], weight, labels)


def test_registered_in_op_table():
    assert {"torch", "chunked", "triton"} <= set(ops.available("linear_cross_entropy"))
    assert ops.current("linear_cross_entropy", "cpu") == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_gpu_bf16_stablelm_vocab(impl):
    """The report model's shape: ~800 labelled tokens, hidden 2560, vocab 50304, bf16; equal loss and grads, and
    with a frozen head (LoRA) the op's extra memory stays far below the reference's [T, V] logits."""
    hidden, weight, _, labels = _inputs(800, 2560, 50304, torch.bfloat16, False, seed=8, ignore_every=0)
    want, want_grads = _run(linear_cross_entropy_ref, hidden, weight, None, labels)
    got, got_grads = _run(IMPLS[impl], hidden, weight, None, labels)
    assert abs(got.item() - want.item()) <= LOSS_RTOL[torch.bfloat16] * abs(want.item())
    for name, g, w in zip(("hidden", "weight"), got_grads, want_grads):
        _close(g, w, torch.bfloat16, name)
    peaks = {}
    for name, fn in (("ref", linear_cross_entropy_ref), ("impl", IMPLS[impl])):
        h = hidden.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(h, weight, labels).backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    # Reference: bf16 logits (80 MB) + their float32 copy (161 MB) + gradients of both. Chunked: one chunk of 256
    # rows (26 MB bf16 + 51 MB float32 for "chunked", none for "triton") + grad_hidden (4 MB).
    assert peaks["ref"] > 800 * 50304 * 6
    assert peaks["impl"] < 256 * 50304 * 8 + 16 * 2 ** 20, peaks
