"""StableLM decoder, written from scratch: the backbone (embed -> N x Block -> final LayerNorm) and the classes
built on it, as in transformers: StableLMModel (hidden states), StableLM (causal LM, + lm_head),
StableLMForSequenceClassification (+ score, pooled at each row's last token) and StableLMForTokenClassification
(+ dropout + score per token).

All arithmetic beyond the linear layers goes through `stablelm.ops`, so kernels are swapped without editing
this file. Parameter layout (the converted checkpoint format): q/k/v are one fused `qkv` projection and the
MLP's gate/up one fused `gate_up` projection, so each is a single matmul.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .cache import KVCache
from .config import StableLMConfig

# Prompt tokens per prefill forward: bounds a long prompt's activation memory by the chunk, while each piece is
# still big enough to run the matmuls at full speed (bench/prefill.py measures it).
DEFAULT_PREFILL_CHUNK = 2048


class Linear(nn.Linear):
    """nn.Linear whose arithmetic is ops.linear (on CUDA a batch-1 decode GEMV where it beats cuBLAS, F.linear
    otherwise and under autograd). Same parameters, state-dict keys and isinstance as nn.Linear, so LoRA,
    quantize_model and checkpoints treat it as one."""

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)


class LayerNorm(nn.Module):
    """LayerNorm whose weight/bias may be per head ([H, N]); the arithmetic is ops.layer_norm."""

    def __init__(self, shape, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x, residual=None):
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)


class Rotary(nn.Module):
    """cos/sin tables [B, S, rotary_dim/2] (float32) for per-token positions, with linear or dynamic scaling."""

    def __init__(self, config: StableLMConfig):
        super().__init__()
        self.dim = config.rotary_dim
        self.theta = config.rope_theta
        self.rope_type = config.rope_type
        self.factor = config.rope_factor
        self.max_pos = config.max_position_embeddings
        # Computed on the CPU whatever device the model is built on (pow may round differently on a GPU), then
        # placed where the module is being built: every construction path holds the same numbers.
        inv_freq = self._inv_freq(self.theta, device="cpu")
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.factor
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def _inv_freq(self, base, device=None) -> torch.Tensor:
        # Same float32 expression as transformers, so the angles agree bit for bit.
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        return 1.0 / (base ** exponent)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() would round the frequencies (positions x a bf16 frequency drift by
        # whole radians at long contexts); they follow the device and stay float32.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor):
        inv_freq = self.inv_freq
        if self.rope_type == "dynamic":
            # NTK-aware base growth once the sequence passes max_position_embeddings; computed on the device
            # (no host sync) from the furthest position in this call, as transformers does.
            seq_len = torch.clamp(positions.max() + 1, min=self.max_pos).float()
            base = self.theta * ((self.factor * seq_len / self.max_pos) - (self.factor - 1)) ** (
                self.dim / (self.dim - 2))
            inv_freq = self._inv_freq(base, device=positions.device)
        freqs = positions.float()[..., None] * inv_freq.to(positions.device)
        return freqs.cos(), freqs.sin()


class Attention(nn.Module):
    def __init__(self, config: StableLMConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.qkv = Linear(config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim,
                          bias=config.use_qkv_bias)
        self.o = Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_layernorm:
            self.q_norm = LayerNorm((self.heads, self.head_dim), config.layer_norm_eps, bias=False)
            self.k_norm = LayerNorm((self.kv_heads, self.head_dim), config.layer_norm_eps, bias=False)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, kv_start, cache: KVCache | None, layer: int, kv_len=None):
        B, S, _ = x.shape
        qkv = self.qkv(x).view(B, S, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is None:
            q, k = ops.rotary(q, k, cos, sin)
            out = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kv_start=kv_start)
            out = out.transpose(1, 2)
        else:
            k_cache, v_cache = cache.k[layer], cache.v[layer]
            q = ops.rotary_cache(q, k, v, cos, sin, k_cache, v_cache, cache.lengths)
            if S == 1:
                out = ops.decode_attention(q[:, 0], k_cache, v_cache, kv_len, kv_start=cache.start)
                out = out[:, None]
            else:
                filled = cache.uniform_length() + S
                out = ops.attention(q.transpose(1, 2), k_cache[:, :, :filled], v_cache[:, :, :filled],
                                    kv_start=cache.start)
                out = out.transpose(1, 2)
        return self.o(out.reshape(B, S, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: StableLMConfig):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        # On the fused [gate; up] output: the backward writes both gradients into one buffer (no split + concat).
        return self.down(ops.swiglu_fused(self.gate_up(x)))


class Block(nn.Module):
    """One decoder layer. It takes the residual stream x and the previous layer's not-yet-added output
    `delta`, so the residual add is fused into this layer's first LayerNorm (one kernel instead of two)."""

    def __init__(self, config: StableLMConfig):
        super().__init__()
        self.parallel = config.use_parallel_residual
        self.ln1 = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.attn = Attention(config)
        self.ln2 = None if self.parallel else LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, delta, cos, sin, kv_start, cache, layer, kv_len=None):
        """Returns (x, delta) with x + delta the layer's output. kv_len: cache lengths after this call's write
        (computed once per forward, not per layer)."""
        if delta is None:
            h = self.ln1(x)
        else:
            h, x = self.ln1(delta, residual=x)
        attn = self.attn(h, cos, sin, kv_start, cache, layer, kv_len)
        if self.parallel:
            return x, attn + self.mlp(h)
        h, x = self.ln2(attn, residual=x)
        return x, self.mlp(h)


# The backbone's submodules: every class here has them under these names, with these state-dict keys.
BACKBONE_MODULES = ("embed", "layers", "norm")


class BackboneOutput(NamedTuple):
    """The backbone's output with `output_hidden_states=True` (transformers' BaseModelOutputWithPast names)."""
    last_hidden_state: torch.Tensor              # [B, S, hidden], after the final LayerNorm
    hidden_states: tuple[torch.Tensor, ...]      # num_layers + 1 tensors, see StableLMModel.forward


class ClassifierOutput(NamedTuple):
    """A head's output (transformers' SequenceClassifierOutput / TokenClassifierOutput names)."""
    logits: torch.Tensor                         # [B, num_labels] or [B, S, num_labels]
    loss: torch.Tensor | None = None             # when labels were given
    hidden_states: tuple[torch.Tensor, ...] | None = None


class StableLMModel(nn.Module):
    """The backbone, transformers' StableLmModel: embed -> N x Block -> final LayerNorm, hidden states out.

    The causal LM and the classification heads subclass it and add their head on top of `forward`'s final
    hidden states, so there is one decoder and the parameter names stay `embed`, `layers`, `norm` (no
    submodule prefix: a converted causal-LM checkpoint loads into any of them).
    """

    def __init__(self, config: StableLMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.rotary = Rotary(config)
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        """The model's float dtype: that of the final LayerNorm, which stays float in every layout (a quantized
        embedding table or linear layer carries integer codes)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @classmethod
    def random(cls, config: StableLMConfig, seed: int = 0, std: float = 0.02, device="cpu",
               dtype: torch.dtype = torch.float32):
        """Random weights for benchmarks and the CPU default: matrices ~ N(0, std), LayerNorm weights near 1
        and biases near 0 (random, never exactly 1/0, so no kernel gets an easy special case)."""
        with torch.device(device):
            model = cls(config).to(dtype)
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, std, generator=gen)
            for m in model.modules():
                if isinstance(m, LayerNorm):
                    m.weight.add_(1.0)
        return model.eval()

    @classmethod
    def from_backbone(cls, source: "StableLMModel", **config_changes):
        """This class over `source`'s decoder (embed, layers, norm: the same tensors, shared, not copied) with a
        fresh head, as transformers initialises one: how a classifier starts from a pretrained causal LM.
        config_changes: fields to set, e.g. num_labels=3, id2label={...}, pad_token_id=0."""
        cfg = dataclasses.replace(source.config, architectures=[ARCHITECTURE_OF[cls]], **config_changes)
        # Built on the meta device so only the new head takes memory.
        with torch.device("meta"):
            model = cls(cfg)
        backbone = {k: v for k, v in source.state_dict().items() if k.split(".")[0] in BACKBONE_MODULES}
        missing, unexpected = model.load_state_dict(backbone, strict=False, assign=True)
        head = {k for k in model.state_dict() if k.split(".")[0] not in BACKBONE_MODULES}
        if unexpected or set(missing) != head:
            raise ValueError(f"{type(source).__name__} does not fit {cls.__name__}: missing "
                             f"{sorted(set(missing) - head)}, unexpected {sorted(unexpected)}")
        for name, child in model.named_children():
            if name not in BACKBONE_MODULES and name != "rotary":
                child.to_empty(device=source.device).to(source.dtype)
                if isinstance(child, nn.Linear):
                    _init_head(child)
        model.rotary = source.rotary
        model.train(source.training)
        return model

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache.for_model(self.config, batch_size, max_len, dtype=self.dtype, device=self.device)

    def forward(self, input_ids: torch.Tensor | None = None, *, input_embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                output_hidden_states: bool = False) -> torch.Tensor | BackboneOutput:
        """Final hidden states [B, S, hidden] after the final LayerNorm (or [B, 1, hidden] with last_only).

        input_ids [B, S] or input_embeds [B, S, hidden]. attention_mask [B, S] (1 = token, 0 = padding) may
        describe left padding (its positions are then counted from each sequence's first real token) or right
        padding (harmless under the causal mask, so nothing changes). With a cache the call appends to it:
        the mask is only accepted on the first (prefill) call, and later calls continue each sequence's
        positions. positions [B, S] override the defaults (transformers' StableLmModel counts positions 0..S-1
        whatever the mask: pass those to reproduce its left-padded outputs).

        output_hidden_states: return BackboneOutput(last_hidden_state, hidden_states) with transformers'
        convention: the embeddings, then each layer's output, the last one replaced by the final LayerNorm's
        output (num_layers + 1 tensors, the last equal to last_hidden_state).
        """
        if output_hidden_states and last_only:
            raise ValueError("output_hidden_states and last_only cannot be combined")
        x = self._embed(input_ids, input_embeds)
        B, S, _ = x.shape
        kv_start = None
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache batch size {cache.batch_size} != input batch size {B}")
            if cache.dtype != x.dtype or cache.device != x.device:
                raise ValueError(f"cache is {cache.dtype} on {cache.device} but activations are {x.dtype} on "
                                 f"{x.device}")
            cache.check_room(S)
        if attention_mask is not None:
            kv_start, default_pos = self._padding(attention_mask, B, S, cache)
        else:
            default_pos = None
        if positions is None:
            if default_pos is not None:
                positions = default_pos
            elif cache is not None:
                positions = (cache.lengths - cache.start)[:, None].long() + torch.arange(S, device=x.device)
            else:
                positions = torch.arange(S, device=x.device)[None].expand(B, S)
        elif positions.shape != (B, S):
            raise ValueError(f"positions shape {tuple(positions.shape)} != (batch, seq) = {(B, S)}")
        cos, sin = self.rotary(positions)
        kv_len = cache.lengths + S if cache is not None else None

        delta = None
        states = [x] if output_hidden_states else None
        for i, block in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x, delta = torch.utils.checkpoint.checkpoint(block, x, delta, cos, sin, kv_start, None, i,
                                                             use_reentrant=False)
            else:
                x, delta = block(x, delta, cos, sin, kv_start, cache, i, kv_len)
            if states is not None and i < len(self.layers) - 1:
                # Blocks hand on (x, delta) with the add left to the next LayerNorm; a reported state needs it.
                states.append(x + delta)
        if cache is not None:
            cache.advance(S)
        if last_only:
            x, delta = x[:, -1:], delta[:, -1:]
        x, _ = self.norm(delta, residual=x)
        if states is None:
            return x
        return BackboneOutput(x, tuple(states) + (x,))

    def _embed(self, input_ids, input_embeds):
        if (input_ids is None) == (input_embeds is None):
            raise ValueError("pass exactly one of input_ids or input_embeds")
        if input_embeds is not None:
            if input_embeds.dim() != 3 or input_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"input_embeds must be [batch, seq, {self.config.hidden_size}], got "
                                 f"{tuple(input_embeds.shape)}")
            if input_embeds.dtype != self.dtype:
                raise ValueError(f"input_embeds dtype {input_embeds.dtype} != model dtype {self.dtype}")
            return input_embeds
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        return self.embed(input_ids)

    @staticmethod
    def _padding(mask, B, S, cache):
        """(kv_start, positions) for a left-padded mask; (None, None) for right padding / no padding."""
        if mask.shape != (B, S):
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != (batch, seq) = {(B, S)}")
        mask = mask.to(torch.int32)
        if cache is not None and max(cache.host_lengths) > 0:
            raise ValueError("attention_mask is only accepted on the first (prefill) call into a cache")
        steps = mask[:, 1:] - mask[:, :-1]
        left_padded = bool((steps >= 0).all())
        if not left_padded:
            if bool((steps <= 0).all()):
                return None, None
            raise ValueError("attention_mask must be left-padded (0...0 1...1) or right-padded (1...1 0...0)")
        start = S - mask.sum(-1)
        if bool((start >= S).any()):
            raise ValueError("attention_mask has a row with no tokens")
        if cache is not None:
            cache.set_start(start)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return start.to(torch.int32), positions

    def num_params(self) -> int:
        """Logical parameter count: a quantized linear (stablelm/quantize.py, its weight packed into buffers)
        counts as the float weight and bias it stands for."""
        return sum(p.numel() for p in self.parameters()) + sum(
            m.logical_numel() for m in self.modules() if hasattr(m, "logical_numel"))


class StableLM(StableLMModel):
    """Causal LM (transformers' StableLmForCausalLM): the backbone's final hidden states through lm_head (or the
    embedding matrix when tie_word_embeddings)."""

    def __init__(self, config: StableLMConfig):
        super().__init__(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size,
                                                                     bias=False)

    def forward(self, input_ids: torch.Tensor | None = None, *, input_embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, vocab] (or [B, 1, vocab] with last_only); arguments as StableLMModel.forward."""
        x = super().forward(input_ids, input_embeds=input_embeds, positions=positions,
                            attention_mask=attention_mask, cache=cache, last_only=last_only)
        # lm_head may be a QuantLinear (stablelm/quantize.py), which has no float weight: call the module.
        return ops.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)

    def loss(self, input_ids: torch.Tensor | None = None, *, labels: torch.Tensor,
             input_embeds: torch.Tensor | None = None, positions: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """Next-token cross-entropy (transformers' labels convention: labels [B, S] aligned with the inputs, shifted
        here, ignore_index ignored), equal to F.cross_entropy(self(...)[:, :-1].float(), labels[:, 1:]).

        Only the positions whose next label counts go through the head (a prompt or image position needs no
        logits), and the head and the loss are one op (ops.linear_cross_entropy: on CUDA chunked over the
        tokens, no [tokens, vocab] float32 logits). A quantized head (QuantLinear) has no float weight to fuse
        with: its logits are computed at those positions, then the loss."""
        hidden = super().forward(input_ids, input_embeds=input_embeds, positions=positions,
                                 attention_mask=attention_mask)
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels shape {tuple(labels.shape)} != (batch, seq) = {tuple(hidden.shape[:2])}")
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != ignore_index  # boolean indexing: one host sync for the count of labelled positions
        return self.head_loss(hidden[:, :-1][keep], targets[keep], ignore_index)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of the head's logits at final hidden states h [T, hidden] against targets [T]
        (ignore_index ignored), the head and the loss as one op where the head has a float weight."""
        head = self.lm_head
        if head is None or isinstance(head, nn.Linear):
            weight = self.embed.weight if head is None else head.weight
            bias = None if head is None else head.bias
            return ops.linear_cross_entropy(h, weight, targets, bias, ignore_index)
        return F.cross_entropy(head(h).float(), targets, ignore_index=ignore_index)

    def prefill(self, cache: KVCache, input_ids: torch.Tensor | None = None, *,
                input_embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                chunk: int | None = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
        """Write a prompt into an empty cache; returns the last position's logits [B, vocab].

        The prompt goes through in pieces of `chunk` tokens (None: in one piece), so activation memory is
        bounded by the chunk, not the prompt; logits agree with a one-piece prefill up to float rounding. The
        mask is read on the first call into a cache only, so the first piece is stretched past the longest
        left padding: every row then has a real token in it and its start is known before the next piece.
        """
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"prefill chunk must be a positive integer or None, got {chunk!r}")
        if max(cache.host_lengths) > 0:
            raise ValueError("prefill needs an empty cache (call cache.reset() first)")
        prompt = input_ids if input_ids is not None else input_embeds
        if prompt is None or input_ids is not None and input_embeds is not None:
            raise ValueError("pass exactly one of input_ids or input_embeds")
        if prompt.dim() < 2 or prompt.shape[1] == 0:
            raise ValueError(f"prefill needs a [batch, seq >= 1, ...] prompt, got shape {tuple(prompt.shape)}")
        S = prompt.shape[1]
        end = S if chunk is None else min(S, chunk)
        if attention_mask is not None and end < S:
            padding = attention_mask.shape[-1] - attention_mask.to(torch.int32).sum(-1)
            end = min(S, max(end, int(padding.max()) + 1))
        begin = 0
        while True:
            piece = dict(input_ids=None if input_ids is None else input_ids[:, begin:end],
                         input_embeds=None if input_embeds is None else input_embeds[:, begin:end])
            mask = attention_mask[:, :end] if begin == 0 and attention_mask is not None else None
            logits = self(**piece, attention_mask=mask, cache=cache, last_only=True)
            if end >= S:
                return logits[:, -1]
            begin, end = end, min(S, end + chunk)


# ---------------------------------------------------------------- classification heads
def _init_head(linear: nn.Linear) -> nn.Linear:
    # transformers' StableLM init for a new head: N(0, initializer_range = 0.02), bias 0.
    if linear.weight.device.type != "meta":
        with torch.no_grad():
            linear.weight.normal_(0.0, 0.02)
            if linear.bias is not None:
                linear.bias.zero_()
    return linear


def last_token_index(input_ids: torch.Tensor | None, batch_size: int, pad_token_id: int | None):
    """The position each row is pooled at, by transformers' rule: the rightmost token != pad_token_id (so left
    and right padding both work, and a row of only padding pools at 0); -1 without a pad id (batch size 1 only)
    or with input embeddings (no ids to look at)."""
    if pad_token_id is None:
        if batch_size != 1:
            raise ValueError("sequence classification of a batch needs config.pad_token_id to find each row's last "
                             "token")
        return -1
    if input_ids is None:
        warnings.warn("sequence classification cannot find padding in input_embeds: it pools the last position "
                      "of every row (as transformers does)", stacklevel=3)
        return -1
    not_pad = (input_ids != pad_token_id).to(torch.int32)
    return (torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32) * not_pad).argmax(-1)


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: StableLMConfig):
    """transformers' ForSequenceClassificationLoss. An unset problem_type is inferred on the first call and
    written into the config, as transformers does, so later batches keep the same loss."""
    n = config.num_labels
    if config.problem_type is None:
        if n == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        if n == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, n), labels.view(-1), ignore_index=-100)
    return F.binary_cross_entropy_with_logits(logits, labels)


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int):
    """transformers' ForTokenClassification: cross entropy in float32 over all tokens, label -100 ignored."""
    return F.cross_entropy(logits.reshape(-1, num_labels).float(), labels.reshape(-1).to(logits.device),
                           ignore_index=-100)


class StableLMForSequenceClassification(StableLMModel):
    """transformers' StableLmForSequenceClassification: `score` (no bias) on the hidden state of each row's last
    non-padding token (`last_token_index`); losses for regression, single- and multi-label classification."""

    def __init__(self, config: StableLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.score = _init_head(nn.Linear(config.hidden_size, config.num_labels, bias=False))

    def forward(self, input_ids: torch.Tensor | None = None, *, input_embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool = False) -> ClassifierOutput:
        """ClassifierOutput(logits [B, num_labels], loss when labels are given, hidden_states when asked).
        Inputs as StableLMModel.forward; labels: [B] class ids, [B] / [B, num_labels] float targets
        (regression), or [B, num_labels] multi-hot floats."""
        out = super().forward(input_ids, input_embeds=input_embeds, positions=positions,
                              attention_mask=attention_mask, output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state if output_hidden_states else out
        B = hidden.shape[0]
        last = last_token_index(input_ids, B, self.config.pad_token_id)
        # score is per token, so scoring only the pooled rows equals transformers' score-then-pool, on B rows
        # instead of B * S.
        pooled = hidden[torch.arange(B, device=hidden.device), last]
        # A trained head may keep float32 weights over a bf16 decoder (see stablelm.classify).
        logits = self.score(pooled.to(self.score.weight.dtype))
        loss = None if labels is None else sequence_classification_loss(logits, labels, self.config)
        return ClassifierOutput(logits, loss, out.hidden_states if output_hidden_states else None)


class StableLMForTokenClassification(StableLMModel):
    """transformers' StableLmForTokenClassification: dropout then `score` (with bias) on every token's hidden
    state. Dropout is config.classifier_dropout, else hidden_dropout (always 0 in this project's configs), as
    transformers picks it."""

    def __init__(self, config: StableLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dropout = nn.Dropout(config.classifier_dropout if config.classifier_dropout is not None else 0.0)
        self.score = _init_head(nn.Linear(config.hidden_size, config.num_labels, bias=True))

    def forward(self, input_ids: torch.Tensor | None = None, *, input_embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool = False) -> ClassifierOutput:
        """ClassifierOutput(logits [B, S, num_labels], loss when labels [B, S] are given (-100: ignored),
        hidden_states when asked). Inputs as StableLMModel.forward."""
        out = super().forward(input_ids, input_embeds=input_embeds, positions=positions,
                              attention_mask=attention_mask, output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state if output_hidden_states else out
        logits = self.score(self.dropout(hidden).to(self.score.weight.dtype))
        loss = None if labels is None else token_classification_loss(logits, labels, self.num_labels)
        return ClassifierOutput(logits, loss, out.hidden_states if output_hidden_states else None)


# config.architectures[0] -> the class that runs it.
MODEL_CLASSES = {"StableLmForCausalLM": StableLM, "StableLmModel": StableLMModel,
                 "StableLmForSequenceClassification": StableLMForSequenceClassification,
                 "StableLmForTokenClassification": StableLMForTokenClassification}
ARCHITECTURE_OF = {cls: name for name, cls in MODEL_CLASSES.items()}


def model_class(config: StableLMConfig) -> type[StableLMModel]:
    return MODEL_CLASSES[config.architecture]
