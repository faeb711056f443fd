"""LoRA (low-rank adapters) for nn.Linear layers and the fine-tuning recipe shared by every trainer here.

`apply_lora(module, targets, r, alpha, dropout)` wraps every nn.Linear whose qualified name ends with one of
`targets`; a target may name output ranges, so a fused projection (our [q; k; v] `qkv`) can get adapters on q and
v only, like LoRA on separate q_proj / v_proj layers. A quantized stand-in for nn.Linear (stablelm/quantize.py's
QuantLinear / NF4Linear) is wrapped the same way: QLoRA, the frozen base being quantized.

Two layouts for a fused projection with several ranges:
  fused (default)  one adapter over all the ranges: A [r, K] shared, B [rows, r] (`LM_TARGETS`: 4 per layer).
  separate         one adapter per range, as peft puts one on each of q_proj / k_proj / v_proj / gate_proj / up_proj
                   (`peft_targets(config)`: q/k/v/o/gate/up/down, 7 per layer, peft's trainable parameter count),
                   still computed through the fused projection: the n adapters' A matrices are stacked into one
                   [n * r, K] lora_A, so x @ A^T is one matmul shared by q/k/v (or gate/up), and their B matrices,
                   stored stacked as lora_B [rows, r], act as the block-diagonal [rows, n * r] matrix (one matmul,
                   its zero blocks cost n times a rank-r product, small next to the base matmul). One dropout mask
                   on x serves the n adapters (peft draws one per adapter: equal in distribution, not draw for draw;
                   identical without dropout).

The adapters train in float32 on a bf16/fp16 base, as peft's do. Their input product x @ A^T is one autograd
function (_LoRAInput) that keeps the dropped input for A's gradient in x's own dtype with a bool mask, where
autograd through `dropout(x).float() @ A.t()` would keep a float32 copy: 2 bytes per input element instead of 4, on
the four wide inputs of every layer (measured at the 3B shape: the largest saved activation of a LoRA step). The
output takes dropout's 1 / (1 - p) folded into its scale (one multiply, not two: an eager step is launch-bound,
so every kernel counts).

The base weight is frozen; B starts at zero so a fresh adapter leaves the model's output unchanged. `LM_TARGETS` are
the decoder's linears; `make_optimizer` is the AdamW + cosine decay the report model trains with (float32 master
weights in the optimizer for a model trained in bf16: stablelm/optim.py), and
`trainable_state_dict` what its checkpoints keep. It lives in stablelm/ (not vision/) so the classification heads
and the report model train through the same code.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .optim import SIXTEEN_BIT, MasterAdamW
from .quantize import QUANTIZED_LINEARS

# What LoRA wraps: nn.Linear and its frozen quantized stand-ins.
LINEAR_TYPES = (nn.Linear,) + QUANTIZED_LINEARS


class _LoRAInput(torch.autograd.Function):
    """h = (x * mask) @ A^T, computed in A's dtype (float32), mask the dropout's kept entries (all when p is 0
    or not training); dropout's 1 / (1 - p) is left to the caller, which folds it into the adapter's scale.
    Dropout zeroes entries exactly in any dtype, so the kept input is saved as x * mask in x's dtype. The mask is
    saved too: x * mask alone cannot tell a dropped entry from an entry that was zero, which x's gradient needs."""

    @staticmethod
    def forward(ctx, x, A, p: float, training: bool):
        mask = None
        if training and p > 0:
            mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
            x = x * mask
        ctx.save_for_backward(x, mask, A)
        return x.to(A.dtype) @ A.t()

    @staticmethod
    def backward(ctx, grad_h):
        kept, mask, A = ctx.saved_tensors
        grad_x = grad_A = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ A
            if mask is not None:
                grad_x = grad_x * mask
            grad_x = grad_x.to(kept.dtype)
        if ctx.needs_input_grad[1]:
            grad_A = grad_h.reshape(-1, grad_h.shape[-1]).t() @ kept.reshape(-1, kept.shape[-1]).to(A.dtype)
        return grad_x, grad_A, None, None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 out_ranges: list[tuple[int, int]] | None = None, separate: bool = False):
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
        device = next(iter(base.state_dict().values())).device
        # separate: one adapter per range (A stacked [n * r, K], B stacked [rows, r], used block-diagonally).
        self.separate = separate and len(self.out_ranges) > 1
        self.sizes = [hi - lo for lo, hi in self.out_ranges]
        n = len(self.out_ranges) if self.separate else 1
        self.lora_A = nn.Parameter(torch.empty(n * r, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(covered, r, device=device, dtype=torch.float32))
        for a in self.lora_A.data.split(r):  # each adapter's A as peft / nn.Linear initialises it (fan_in = K)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scale = alpha / r
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)
        if self.separate:  # which entries of the repeated lora_B belong to each adapter's diagonal block
            block_mask = torch.block_diag(*[torch.ones(size, r, dtype=torch.bool) for size in self.sizes])
            self.register_buffer("_block_mask", block_mask.to(device), persistent=False)
        ranges = sorted(self.out_ranges)
        self._contiguous = ranges == self.out_ranges and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        self._covers_all = self._contiguous and ranges[0][0] == 0 and ranges[-1][1] == base.out_features

    def lora_B_matrix(self):
        """[rows, n * r]: lora_B itself (fused), or the block-diagonal of each adapter's B (separate): lora_B
        repeated n times across and masked, two kernels each way (torch.block_diag takes n + 1, and its backward
        as many again: it runs on every step)."""
        if not self.separate:
            return self.lora_B
        return self.lora_B.repeat(1, len(self.sizes)) * self._block_mask

    def delta_weight(self):
        """scale * B @ A, [rows covered, in_features] (float32)."""
        return (self.lora_B_matrix() @ self.lora_A) * self.scale

    @property
    def weight(self):
        return self.base.weight  # a quantized base has none (its qweight is packed)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        out = self.base(x)
        h = _LoRAInput.apply(x, self.lora_A, self.dropout, self.training)
        dropping = self.training and self.dropout > 0
        alpha = self.scale / (1 - self.dropout) if dropping else self.scale  # scale and dropout's rescaling
        delta = (h @ self.lora_B_matrix().t() * alpha).to(out.dtype)
        if self._covers_all:
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
               dropout: float = 0.0, separate: bool = False) -> list[str]:
    """Wrap each nn.Linear (or QuantLinear / NF4Linear) whose name ends with a key of `targets` (value: output
    ranges or None for all); separate: one adapter per range (see the module docstring). Returns the wrapped
    names; raises if a target matched nothing (a typo would otherwise train nothing)."""
    wrapped, hit = [], set()
    for name, child in list(module.named_modules()):
        if not isinstance(child, LINEAR_TYPES):
            continue
        for suffix, ranges in targets.items():
            if name == suffix or name.endswith("." + suffix):
                parent_name, _, attr = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                setattr(parent, attr, LoRALinear(child, r, alpha, dropout, ranges, separate))
                wrapped.append(name)
                hit.add(suffix)
                break
    missing = set(targets) - hit
    if missing:
        raise ValueError(f"LoRA targets matched no nn.Linear: {sorted(missing)}")
    return wrapped


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


# Every linear of a decoder layer (the report model's `--lm-mode lora` and the classifiers' LoRA).
LM_TARGETS: dict[str, list[tuple[int, int]] | None] = {"attn.qkv": None, "attn.o": None, "mlp.gate_up": None,
                                                       "mlp.down": None}


def peft_targets(config) -> dict[str, list[tuple[int, int]] | None]:
    """peft's layout on StableLM (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj): the ranges of
    q / k / v in the fused qkv and of gate / up in gate_up; use with apply_lora(..., separate=True)."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size
    return {"attn.qkv": [(0, q), (q, q + kv), (q + kv, q + 2 * kv)], "attn.o": None,
            "mlp.gate_up": [(0, inter), (inter, 2 * inter)], "mlp.down": None}


def trainable_state_dict(module: nn.Module) -> dict:
    """Only the tensors that train (requires_grad): what a fine-tuning checkpoint needs beyond the base."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {n: t for n, t in module.state_dict().items() if n in names}


def make_optimizer(module: nn.Module, lr: float, weight_decay: float, total_steps: int, min_lr_ratio=0.01):
    """AdamW over the trainable parameters with cosine decay from lr to min_lr_ratio * lr over total_steps.
    float32 parameters: torch's AdamW, on CUDA the fused one (one pass over weight, gradient and moments per step
    instead of a dozen foreach passes: full fine-tuning reads 45 GB of float32 state a step; LoRA launches fewer
    kernels). bf16 / fp16 parameters (mixed precision): stablelm.optim.MasterAdamW, float32 master weights in the
    optimizer. A mix of the two is refused: one model trains in one precision."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter has requires_grad")
    dtypes = {p.dtype for p in params}
    if dtypes <= set(SIXTEEN_BIT) and len(dtypes) == 1:
        optimizer = MasterAdamW(params, lr=lr, weight_decay=weight_decay)
    elif dtypes & set(SIXTEEN_BIT):
        names = [f"{n} ({p.dtype})" for n, p in module.named_parameters() if p.requires_grad][:6]
        raise ValueError(f"make_optimizer: the trained tensors mix dtypes {sorted(map(str, dtypes))} (e.g. "
                         f"{names}); train every one in float32, or every one in the same 16-bit dtype (float32 "
                         f"master weights in the optimizer)")
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=_fusable(params) or None)

    def cosine(step):
        progress = min(step / max(total_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def _fusable(params) -> bool:
    """Whether torch's fused AdamW takes these parameters: all float on CUDA, none an FSDP2 DTensor shard (kept on
    the foreach path, whose DTensor support is older)."""
    if not all(p.is_cuda and p.is_floating_point() for p in params):
        return False
    from torch.distributed.tensor import DTensor
    return not any(isinstance(p, DTensor) for p in params)


def merge_lora(module: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (W[rows] += scale * B @ A) and put the plain nn.Linear back, so the
    model saves and runs as one without LoRA. Returns the merged names."""
    merged = []
    for name, child in list(module.named_modules()):
        if not isinstance(child, LoRALinear):
            continue
        base = child.base
        if not isinstance(base, nn.Linear):
            raise ValueError(f"merge_lora: {name!r} has a quantized base ({type(base).__name__}); merging would "
                             f"re-quantize it: merge into the float model instead")
        with torch.no_grad():
            delta = child.delta_weight()
            rows = torch.cat([torch.arange(lo, hi, device=delta.device) for lo, hi in child.out_ranges])
            # Summed in float32, rounded once into the base dtype.
            base.weight[rows] = (base.weight[rows].float() + delta).to(base.weight.dtype)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, base)
        merged.append(name)
    return merged
