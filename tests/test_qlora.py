"""Training over a frozen quantized LM (QLoRA) and the per-projection (peft) LoRA layout:

- the Triton input gradient of quant_linear (int8, int4; kernels/quant.py) against autograd through the reference;
- a LoRA step over a tiny int8 / int4 / nf4 LM lowers the loss and leaves every frozen tensor bit-identical;
- gradients reach the input embeddings through a frozen quantized LM (the report model's projector case), Triton
  and reference agreeing;
- LoRA with separate adapters on q/k/v/o/gate/up/down, computed through the fused qkv / gate_up, gives the loss and
  gradients of separate adapters on transformers' StableLmForCausalLM (peft's when peft is installed, otherwise an
  explicit per-projection adapter written here), with peft's trainable parameter count;
- the adapter input product (dropout, then x @ A^T in float32) gives autograd's gradients through the float32
  formula for the same dropout mask, and keeps the dropped input in x's dtype (not a float32 copy);
- StableLM.loss (labelled positions only, fused head + loss) equals the full-logits loss.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stablelm
from kernels.quant import DEQUANT_MATMUL_MIN_ROWS, dequantize_triton, dequantize_weight, quant_grad_input, \
    quant_linear_ref, quant_linear_tiled, quant_linear_triton, quantize_weight
from stablelm import ops
from stablelm.config import PRESETS, preset
from stablelm.lora import LM_TARGETS, LoRALinear, apply_lora, lora_parameters, merge_lora, peft_targets
from stablelm.model import StableLM
from stablelm.quantize import NF4Linear, QuantLinear, quantize_model

from hf_utils import hf_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton vs reference input gradient on the same quantized weight: fp32 differs in summation order; fp16 rounds the
# dequantized weight tile to fp16 before tl.dot (2^-11 relative) and the result to fp16. Outputs are of order 1.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=4e-3, atol=4e-3)}
THREE_B = next(n for n in PRESETS if "3b" in n)
FORMATS = {"int8": (8, 128, "int"), "int4": (4, 32, "int"), "nf4": (4, 32, "nf4")}


# ------------------------------------------------------------------------------------------------ kernel gradients
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,group", [(8, 128), (4, 32), (4, 64)])
@pytest.mark.parametrize("shape,N,K", [((2, 7), 96, 256), ((70,), 40, 128)])
@pytest.mark.parametrize("impl", [quant_linear_triton, quant_linear_tiled])
def test_quant_linear_input_grad_matches_reference(impl, shape, N, K, bits, group, dtype):
    gen = torch.Generator().manual_seed(N + bits)
    q, s, z = (None if t is None else t.to(DEVICE)
               for t in quantize_weight(torch.randn(N, K, generator=gen) * K ** -0.5, bits, group))
    frozen = [t.clone() for t in (q, s, z) if t is not None]
    x = torch.randn(*shape, K, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(N, generator=gen).to(DEVICE, dtype)
    upstream = torch.randn(*shape, N, generator=gen).to(DEVICE, dtype)
    grads = []
    for fn in (impl, quant_linear_ref):
        xi, bi = x.clone().requires_grad_(), bias.clone().requires_grad_()
        out = fn(xi, q, s, z, bi, bits, group)
        out.backward(upstream)
        grads.append((out.detach(), xi.grad, bi.grad))
    (y, gx, gb), (ry, rx, rb) = grads
    torch.testing.assert_close(y, ry, **TOL[dtype])
    assert gx.dtype == dtype and gx.shape == x.shape
    torch.testing.assert_close(gx, rx, **TOL[dtype])
    torch.testing.assert_close(gb, rb, **TOL[dtype])
    assert all(torch.equal(t, f) for t, f in zip([t for t in (q, s, z) if t is not None], frozen))


def test_grad_input_kernel_tilings():
    gen = torch.Generator().manual_seed(1)
    for bits, group in ((8, 128), (4, 64)):
        q, s, z = (None if t is None else t.to(DEVICE)
                   for t in quantize_weight(torch.randn(100, 256, generator=gen), bits, group))
        g = torch.randn(20, 100, generator=gen).to(DEVICE)
        want = g @ dequantize_weight(q, s, z, bits, group)
        for bm, bn, bk in ((16, 16, 16), (32, 64, 64), (16, 128, 32)):
            torch.testing.assert_close(quant_grad_input(g, q, s, z, bits, group, bm, bn, bk), want,
                                       rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(8, 128), (4, 32), (4, 64)])
def test_dequantize_triton_is_the_reference_weight_rounded_once(bits, group, dtype):
    gen = torch.Generator().manual_seed(bits + group)
    q, s, z = (None if t is None else t.to(DEVICE)
               for t in quantize_weight(torch.randn(70, 192, generator=gen), bits, group))  # 70: a partial block
    got = dequantize_triton(q, s, z, bits, group, dtype)
    assert got.dtype == dtype and got.shape == (70, 192)
    want = dequantize_weight(q, s, z, bits, group)
    # float32: a fused multiply-add may round once where the reference rounds twice; others: one ulp of dtype
    ulp = {torch.float32: 2 ** -22, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,group", [(8, 128), (4, 32)])
def test_many_rows_multiply_the_dequantized_weight(bits, group, dtype):
    """From DEQUANT_MATMUL_MIN_ROWS rows quant_linear_triton is exactly F.linear over dequantize_triton's weight,
    forward and input gradient (cuBLAS instead of the fused kernels), and within tolerance of the reference."""
    gen = torch.Generator().manual_seed(5)
    N, K, M = 40, 256, DEQUANT_MATMUL_MIN_ROWS
    q, s, z = (None if t is None else t.to(DEVICE)
               for t in quantize_weight(torch.randn(N, K, generator=gen) * K ** -0.5, bits, group))
    x = torch.randn(2, M // 2, K, generator=gen).to(DEVICE, dtype).requires_grad_()
    bias = torch.randn(N, generator=gen).to(DEVICE, dtype)
    upstream = torch.randn(2, M // 2, N, generator=gen).to(DEVICE, dtype)
    out = quant_linear_triton(x, q, s, z, bias, bits, group)
    out.backward(upstream)
    w = dequantize_triton(q, s, z, bits, group, dtype)
    assert torch.equal(out, F.linear(x.detach(), w, bias))
    assert torch.equal(x.grad.reshape(M, K), upstream.reshape(M, N) @ w)
    xr = x.detach().clone().requires_grad_()
    ref = quant_linear_ref(xr, q, s, z, bias, bits, group)
    ref.backward(upstream)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(x.grad, xr.grad, **TOL[dtype])


# ------------------------------------------------------------------------------------------------ QLoRA training
def _quantized_tiny(fmt_name, seed=3):
    bits, group, fmt = FORMATS[fmt_name]
    cfg = preset("tiny", num_key_value_heads=2)
    model = StableLM.random(cfg, seed=seed, device=DEVICE)
    return cfg, quantize_model(model, bits, group, fmt=fmt)


def _batch(cfg, seed=0, B=2, S=16):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=gen).to(DEVICE)
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt with no labels, as the report model's
    return ids, labels


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_qlora_step_lowers_loss_and_keeps_frozen_weights(fmt_name, impl):
    cfg, model = _quantized_tiny(fmt_name)
    model.requires_grad_(False)  # the float tensors (embeddings, norms) stay frozen too, as the report model does
    wrapped = apply_lora(model, peft_targets(cfg), r=8, alpha=16, dropout=0.1, separate=True)
    assert len(wrapped) == 4 * cfg.num_hidden_layers
    base = model.layers[0].attn.qkv.base
    assert isinstance(base, NF4Linear if fmt_name == "nf4" else QuantLinear)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids, labels = _batch(cfg)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    with ops.using(quant_linear=impl, nf4_linear=impl):
        model.eval()
        with torch.no_grad():
            before = model.loss(ids, labels=labels).item()
        model.train()
        for _ in range(3):
            loss = model.loss(ids, labels=labels)
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_parameters(model))
            opt.step()
        model.eval()
        with torch.no_grad():
            after = model.loss(ids, labels=labels).item()
    assert after < before - 1e-3, (before, after)
    for n, t in model.state_dict().items():
        if "lora_" not in n:
            assert t.dtype == frozen[n].dtype and torch.equal(t, frozen[n]), n
    for buf in model.buffers():
        assert buf.grad is None


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_input_embeds_grad_through_frozen_quantized_lm(fmt_name):
    """The report model with a frozen LM trains only the projector: the gradient must reach the embeddings."""
    cfg, model = _quantized_tiny(fmt_name, seed=4)
    ids, labels = _batch(cfg, seed=1)
    embeds = model.embed(ids).detach()
    grads = {}
    for impl in ("torch", "triton"):
        e = embeds.clone().requires_grad_()
        with ops.using(quant_linear=impl, nf4_linear=impl):
            model.loss(input_embeds=e, labels=labels).backward()
        grads[impl] = e.grad
    assert grads["torch"].abs().max() > 0
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-6)


def test_lora_wraps_quantized_bases_and_refuses_to_merge_them():
    cfg, model = _quantized_tiny("int4")
    apply_lora(model, LM_TARGETS, r=4, alpha=8)
    assert isinstance(model.layers[0].mlp.down, LoRALinear)
    with pytest.raises(ValueError, match="quantized base"):
        merge_lora(model)


# ------------------------------------------------------------------------------------------------ peft layout
class _SeparateAdapter(nn.Module):
    """peft's LoraLayer forward on one nn.Linear: base(x) + B(A(dropout(x))) * alpha / r (dropout 0 here)."""

    def __init__(self, base, A, B, scale):
        super().__init__()
        self.base, self.scale = base, scale
        self.A, self.B = nn.Parameter(A.clone()), nn.Parameter(B.clone())

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * self.scale


HF_NAMES = {"attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "attn.o": ["self_attn.o_proj"],
            "mlp.gate_up": ["mlp.gate_proj", "mlp.up_proj"], "mlp.down": ["mlp.down_proj"]}


def _adapters_of(lora: LoRALinear, r):
    """[(A_i, B_i)] of each separate adapter inside one LoRALinear."""
    return list(zip(lora.lora_A.split(r), lora.lora_B.split(lora.sizes)))


def test_peft_layout_matches_separate_adapters_on_transformers(tmp_path):
    r, alpha = 4, 8
    hf = hf_model(seed=7, num_key_value_heads=2)  # GQA: q, k, v of different widths
    hf.save_pretrained(tmp_path)
    ours = stablelm.load(tmp_path)
    cfg = ours.config
    ours.requires_grad_(False)
    apply_lora(ours, peft_targets(cfg), r=r, alpha=alpha, dropout=0.0, separate=True)
    with torch.no_grad():  # B random too: with B = 0 the A gradients would all be 0
        for p in lora_parameters(ours):
            p.normal_(0, 0.1)
    try:
        import peft
    except ImportError:
        peft = None
    if peft is not None:
        ref = peft.get_peft_model(hf, peft.LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        ref_layers = ref.base_model.model.model.layers
    else:
        ref_layers = hf.model.layers
        for p in hf.parameters():
            p.requires_grad_(False)
    ref_params = {}  # (layer, hf name) -> (A param, B param)
    for i, layer in enumerate(ours.layers):
        for target, names in HF_NAMES.items():
            lora = layer.get_submodule(target)
            for name, (A, B) in zip(names, _adapters_of(lora, r)):
                module = ref_layers[i].get_submodule(name)
                if peft is not None:
                    pa, pb = module.lora_A["default"].weight, module.lora_B["default"].weight
                    with torch.no_grad():
                        pa.copy_(A)
                        pb.copy_(B)
                else:
                    parent, _, attr = name.rpartition(".")
                    module = _SeparateAdapter(module, A.detach(), B.detach(), alpha / r)
                    setattr(ref_layers[i].get_submodule(parent), attr, module)
                    pa, pb = module.A, module.B
                ref_params[i, name] = (pa, pb)
    model_ref = ref if peft is not None else hf
    n_ref = sum(p.numel() for p in model_ref.parameters() if p.requires_grad)
    assert sum(p.numel() for p in lora_parameters(ours)) == n_ref == sum(
        p.numel() for p in ours.parameters() if p.requires_grad)

    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    ours.eval()
    model_ref.eval()
    loss = ours.loss(ids, labels=labels)
    loss.backward()
    ref_loss = model_ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    for i, layer in enumerate(ours.layers):
        for target, names in HF_NAMES.items():
            lora = layer.get_submodule(target)
            grads = list(zip(lora.lora_A.grad.split(r), lora.lora_B.grad.split(lora.sizes)))
            for name, (ga, gb) in zip(names, grads):
                pa, pb = ref_params[i, name]
                assert ga.abs().max() > 0 and gb.abs().max() > 0, (i, name)
                torch.testing.assert_close(ga, pa.grad, rtol=1e-4, atol=1e-6, msg=f"layer {i} {name} A")
                torch.testing.assert_close(gb, pb.grad, rtol=1e-4, atol=1e-6, msg=f"layer {i} {name} B")


def test_separate_layout_parameter_count_is_peft_s():
    """StableLM-3B's shape, r 16: the issue's 27.7 M (peft, 7 adapters per layer) and 23.7 M (fused, 4 per layer)
    trainable parameters of the report model, i.e. the adapters plus the projector (Swin-base's 1024 features ->
    Linear + LayerNorm at hidden 2560: 2.63 M)."""
    cfg = preset(THREE_B)
    with torch.device("meta"):
        model = StableLM(cfg)
    apply_lora(model, peft_targets(cfg), r=16, alpha=16, separate=True)
    n_sep = sum(p.numel() for p in lora_parameters(model))
    with torch.device("meta"):
        model = StableLM(cfg)
    apply_lora(model, LM_TARGETS, r=16, alpha=16)
    n_fused = sum(p.numel() for p in lora_parameters(model))
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = 16 * ((H + q) + 2 * (H + kv) + (q + H) + 2 * (H + I) + (I + H))
    assert n_sep == L * per_layer
    projector = 1024 * H + H + 2 * H
    assert round((n_sep + projector) / 1e6, 1) == 27.7 and round((n_fused + projector) / 1e6, 1) == 23.7


def test_separate_equals_fused_with_one_range_and_dropout_shares_mask():
    lin = nn.Linear(32, 48)
    fused = LoRALinear(lin, 4, 8, out_ranges=[(0, 16), (16, 48)])
    sep = LoRALinear(lin, 4, 8, out_ranges=[(0, 16), (16, 48)], separate=True)
    assert sep.lora_A.shape == (8, 32) and sep.lora_B.shape == (48, 4) and fused.lora_A.shape == (4, 32)
    with torch.no_grad():
        sep.lora_B.normal_()
    x = torch.randn(5, 32)
    A1, A2 = sep.lora_A.split(4)
    B1, B2 = sep.lora_B.split([16, 32])
    want = lin(x) + torch.cat([x @ A1.t() @ B1.t(), x @ A2.t() @ B2.t()], -1) * 2
    torch.testing.assert_close(sep(x), want)
    torch.testing.assert_close(sep.delta_weight(), torch.cat([B1 @ A1, B2 @ A2]) * 2)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_adapter_input_matches_float32_dropout_formula_and_saves_x_dtype(p, dtype):
    torch.manual_seed(5)
    lin = nn.Linear(64, 40).to(dtype)
    lora = LoRALinear(lin, 8, 16, dropout=p, out_ranges=[(0, 16), (16, 40)], separate=True)
    with torch.no_grad():
        lora.lora_B.normal_()
    lora.train()
    x = torch.randn(3, 5, 64, dtype=dtype)
    x[0, 0, :4] = 0  # zero entries: x's gradient (compared below) must pass where the mask kept them
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = lora(x)
    masks = [t for t in saved if t.dtype == torch.bool and t.shape == x.shape]  # (not lora_B's block mask)
    assert len(masks) == (p > 0)
    mask = masks[0] if masks else torch.ones_like(x, dtype=torch.bool)
    if p > 0:
        assert 0 < mask.float().mean() < 1
    # what the backward keeps of x: its own dtype, never a float32 copy (for a bf16 base)
    wide = [t for t in saved if t.numel() == x.numel() and t.dtype != torch.bool]
    assert wide and all(t.dtype == dtype for t in wide)
    g = torch.randn_like(out)
    gx, gA, gB = torch.autograd.grad(out, (x, lora.lora_A, lora.lora_B), g)

    xr = x.detach().clone().requires_grad_()
    A, B = lora.lora_A.detach().clone().requires_grad_(), lora.lora_B.detach().clone().requires_grad_()
    h = (xr.float() * mask / (1 - p)) @ A.t()
    Bm = torch.block_diag(*B.split(lora.sizes))
    want = lin(xr) + (h @ Bm.t() * lora.scale).to(dtype)
    rx, rA, rB = torch.autograd.grad(want, (xr, A, B), g)
    # float32: the 1 / (1 - p) factor is applied after the product instead of before (rounding order); bf16: the
    # output and x's gradient are rounded to bf16 (2^-8 relative) after float32 math on both sides
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, want, **tol)
    torch.testing.assert_close(gx, rx, **tol)
    torch.testing.assert_close(gA, rA, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gB, rB, rtol=1e-5, atol=1e-5)


def test_adapter_dropout_rejects_out_of_range():
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(8, 8), 2, 4, dropout=1.0)


# ------------------------------------------------------------------------------------------------ labelled-only loss
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("impl", ["torch", "chunked", "triton"])
def test_lm_loss_equals_full_logits_loss(tied, impl):
    cfg = preset("tiny", tie_word_embeddings=tied)
    model = StableLM.random(cfg, seed=9)
    for p in model.parameters():
        p.requires_grad_(True)
    ids, labels = _batch(cfg, seed=2)
    logits = model(ids)
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with ops.using(linear_cross_entropy=impl):
        got = model.loss(ids, labels=labels)
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lm_loss_with_quantized_head_and_bad_labels():
    cfg = preset("tiny")
    model = quantize_model(StableLM.random(cfg, seed=9), 8, 128, skip=())
    ids, labels = _batch(cfg, seed=3)
    with torch.no_grad():
        logits = model(ids)
        want = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        torch.testing.assert_close(model.loss(ids, labels=labels), want)
        with pytest.raises(ValueError, match="labels shape"):
            model.loss(ids, labels=labels[:, :-1])


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("bits,group", [(8, 128), (4, 128)])
@pytest.mark.parametrize("M", [190, 1520])
def test_gpu_bf16_grad_input_3b_sizes(bits, group, M):
    for N, K in ((7680, 2560), (2560, 6912)):
        q, s, z = (None if t is None else t.cuda()
                   for t in quantize_weight(torch.randn(N, K) * K ** -0.5, bits, group))
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = quant_linear_triton(x, q, s, z, None, bits, group)
        g = torch.randn_like(out)
        out.backward(g)
        ref = g.float() @ dequantize_weight(q, s, z, bits, group)
        assert ((x.grad.float() - ref).norm() / ref.norm()).item() < 1e-2
