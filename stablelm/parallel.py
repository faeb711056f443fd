"""Tensor parallelism for inference over torch.distributed (NCCL on GPUs, gloo on the CPU), launched by torchrun.

    torchrun --nproc-per-node 2 -m stablelm generate --model DIR --tp 2 --prompt "..."
    model = stablelm.load(DIR, device="cuda", tp=2)      # in a script started by torchrun

Megatron layout, one model implementation: every rank builds the ordinary StableLM from a `RankConfig` (its own
head / kv-head / MLP counts; head_dim stays the full model's), loads its slices of the weights into it, and then
three kinds of module are swapped for the parallel ones below:

  qkv, gate_up   column-parallel: rank r holds its heads' q/k/v rows and its share of the gate and up rows, so
                 they stay plain nn.Linear / QuantLinear (the input is replicated, nothing to communicate).
                 With GQA the kv heads are split across ranks, or, with fewer kv heads than ranks, each rank holds
                 the one kv head its query heads read (replicated over tp / kv_heads ranks).
  o, down        RowParallelLinear: the rank's columns (its heads' / its MLP share's inputs), a partial product,
                 one all-reduce per layer each; a bias is added once, after the sum.
  lm_head        VocabParallelHead: the rank's vocabulary rows (a slice of the replicated embedding when tied),
                 then an all-gather, so every rank holds the whole, identical logits. Sampling and beam search then
                 run unchanged and stay in step on every rank (same seed, same logits, same choices). A
                 distributed argmax / sampling would move B x tp numbers instead of B x vocab per step; at decode
                 batch sizes the all-gather is a few hundred KB, so correctness and simplicity win for now.
  embed          replicated (one row read per token; sharding it would add a collective before layer 0), a
                 quantized one (`--quantize-embedding`, a QuantEmbedding) too: its codes / scales / zeros whole.

The KV cache is per rank (model.make_cache sizes it from the RankConfig: local kv heads). Quantized checkpoints
(stablelm/quantize.py formats) are sliced in their stored form: column-parallel layers by rows of qweight /
scales / zeros; row-parallel ones along K, which for int4 means K / tp must be a multiple of group_size (a group's
scale must not straddle two ranks; an error says so). Each rank reads only its slices of model.safetensors
(safetensors `get_slice` over the mmap'd file); a Hugging Face directory is converted in memory in full and then
sliced (convert it first to save every rank that read).

Process group: `init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
puts the rank on cuda:LOCAL_RANK (never on RANK: several hosts are the same as one), and uses a finite timeout
(STABLELM_DIST_TIMEOUT seconds, default 300) so a rank that dies mid-collective cannot hang the others forever;
torchrun also tears the whole job down when one worker fails (the only guard for collectives replayed from a CUDA
graph, which NCCL's watchdog does not time). With no torchrun environment and tp=1 it starts a
world of one in process (an in-memory store), which runs the same code path through NCCL / gloo.

CUDA graphs: the decode session captures the all-reduces and the all-gather like any kernel. That needs the NCCL
backend with the communicator bound to the current device before capture (`init_distributed` passes device_id,
which creates it eagerly, and the session's warm-up runs precede capture), and NCCL >= 2.9.6. Inference only:
there is no backward through these collectives.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from . import ops
from .config import StableLMConfig
from .convert import CheckpointError, check_tensors
from .model import Linear, Rotary, StableLM
from .quantize import QuantLinear, match_embedding_dtype, quantize_kwargs, quantize_model

TIMEOUT_ENV = "STABLELM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ---------------------------------------------------------------- process group
def init_distributed(device: str | torch.device = "cpu", timeout: float | None = None) -> torch.device:
    """Join the default process group (starting it if needed) and return this rank's device: "cuda" becomes
    cuda:LOCAL_RANK (an explicit index is kept); the backend is NCCL for CUDA, gloo otherwise."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)) if timeout is None else float(timeout)
    kwargs = dict(backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=seconds))
    if device.type == "cuda":
        kwargs["device_id"] = device  # eager communicator on this device: later collectives can be graph-captured
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        # Not under torchrun: a world of one, in process (no port to pick).
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(**kwargs)
    atexit.register(_destroy)
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """End a run that succeeded on every rank: wait for the others, then leave the process group. A rank that tears
    its connections down while a peer's last collective is still completing can abort that peer (gloo: "terminate
    called without an active exception", seen once in CI under torchrun); the barrier orders it. For clean exits
    only: a failing rank must not wait at a barrier its peers never reach (the atexit handler skips it)."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def print_on_rank0_only() -> None:
    """Send this process's stdout to /dev/null unless it is rank 0 (stderr stays: errors come from every rank)."""
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")


# ---------------------------------------------------------------- one rank's share
@dataclass
class RankConfig(StableLMConfig):
    """One rank's share of a model, as the model code reads it: num_attention_heads, num_key_value_heads and
    intermediate_size are this rank's; head_dim (and so the rotary dims) stay the full model's; the vocabulary
    stays whole (the head all-gathers its logits). `full()` is the model's own config."""
    tp_size: int = 1
    tp_rank: int = 0
    full_attention_heads: int = 0
    full_key_value_heads: int = 0
    full_intermediate_size: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.full_attention_heads

    def validate(self) -> None:
        self.full()  # the shares themselves are checked by Shard.of

    def full(self) -> StableLMConfig:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(StableLMConfig)}
        fields.update(num_attention_heads=self.full_attention_heads, num_key_value_heads=self.full_key_value_heads,
                      intermediate_size=self.full_intermediate_size)
        return StableLMConfig(**fields)


class Shard(NamedTuple):
    """What rank `rank` of `size` holds: query heads, kv heads, MLP channels and vocabulary rows (ranges), and
    `vocab_chunk`, the padded per-rank vocabulary the all-gather moves (the last rank may hold fewer rows)."""
    rank: int
    size: int
    heads: range
    kv_heads: range
    intermediate: range
    vocab: range
    vocab_chunk: int

    @classmethod
    def of(cls, cfg: StableLMConfig, rank: int, size: int, quant: dict | None = None) -> "Shard":
        """Rank `rank`'s share, or ValueError saying which dimension does not split `size` ways."""
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"tp must be a positive integer, got {size!r}")
        H, KV, inter, V = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
                           cfg.vocab_size)
        if H % size:
            raise ValueError(f"tp={size}: num_attention_heads={H} does not split evenly over {size} ranks")
        if KV >= size and KV % size or KV < size and size % KV:
            raise ValueError(f"tp={size}: num_key_value_heads={KV} must be a multiple or a divisor of tp (kv heads "
                             f"are split across ranks, or replicated when fewer than ranks)")
        if inter % size:
            raise ValueError(f"tp={size}: intermediate_size={inter} does not split evenly over {size} ranks")
        h = H // size
        heads = range(rank * h, (rank + 1) * h)
        if KV >= size:
            k = KV // size
            kv_heads = range(rank * k, (rank + 1) * k)
        else:
            kv = rank // (size // KV)  # the kv head this rank's query heads read
            kv_heads = range(kv, kv + 1)
        i = inter // size
        chunk = -(-V // size)
        vocab = range(min(V, rank * chunk), min(V, (rank + 1) * chunk))
        if not len(vocab):
            raise ValueError(f"tp={size}: vocab_size={V} is too small to give every rank vocabulary rows")
        if quant and quant.get("format", "int") != "int":
            raise ValueError(f"tensor parallelism slices the int8 / int4 formats; this checkpoint is "
                             f"{quant['format']}: load it without tp=, or convert the model with --quant int8 / "
                             f"int4 to shard it")
        if quant and quant.get("bits") == 4:
            g = quant["group_size"]
            for layer, k_local in (("attn.o", h * cfg.head_dim), ("mlp.down", i)):
                if k_local % g:
                    raise ValueError(f"tp={size}: the int4 row-parallel layer {layer} gets K/tp={k_local} input "
                                     f"columns per rank, not a multiple of group_size={g} (a group's scale would "
                                     f"straddle two ranks): use another tp, or int4 with a group size dividing "
                                     f"{k_local}")
        return cls(rank, size, heads, kv_heads, range(rank * i, (rank + 1) * i), vocab, chunk)

    def config(self, cfg: StableLMConfig) -> RankConfig:
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(StableLMConfig)}
        fields.update(num_attention_heads=len(self.heads), num_key_value_heads=len(self.kv_heads),
                      intermediate_size=len(self.intermediate))
        return RankConfig(**fields, tp_size=self.size, tp_rank=self.rank, full_attention_heads=cfg.num_attention_heads,
                          full_key_value_heads=cfg.num_key_value_heads, full_intermediate_size=cfg.intermediate_size)

    def slices(self, name: str, cfg: StableLMConfig, quant: dict | None) -> tuple[int, list[tuple[int, int]]] | None:
        """(dim, [(start, stop), ...]) of the full tensor `name` (project layout) this rank holds, concatenated in
        that order along dim; None: the rank holds all of it."""
        module, _, leaf = name.rpartition(".")
        kind = module.rsplit(".", 1)[-1]
        hd, H, KV, inter = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
        q, kv, i = self.heads, self.kv_heads, self.intermediate
        if kind == "qkv":  # rows [q heads | k heads | v heads], biases too
            return 0, [(q.start * hd, q.stop * hd), ((H + kv.start) * hd, (H + kv.stop) * hd),
                       ((H + KV + kv.start) * hd, (H + KV + kv.stop) * hd)]
        if kind == "gate_up":  # rows [gate | up]
            return 0, [(i.start, i.stop), (inter + i.start, inter + i.stop)]
        if kind == "q_norm":
            return 0, [(q.start, q.stop)]
        if kind == "k_norm":
            return 0, [(kv.start, kv.stop)]
        if kind == "lm_head":  # weight, or qweight / scales / zeros: all [vocab, ...]
            return 0, [(self.vocab.start, self.vocab.stop)]
        if kind in ("o", "down"):  # along K (dim 1); a bias is [N] and added once
            lo, hi = (q.start * hd, q.stop * hd) if kind == "o" else (i.start, i.stop)
            bits = quant["bits"] if quant else None
            if leaf == "bias" or (bits == 8 and leaf == "scales"):  # int8 scales are per output row [N]
                return None
            per = {"weight": 1, "qweight": 2 if bits == 4 else 1, "scales": quant and quant.get("group_size"),
                   "zeros": quant and quant.get("group_size")}[leaf]
            return 1, [(lo // per, hi // per)]
        return None


# ---------------------------------------------------------------- parallel modules
def _inference_only(t: torch.Tensor) -> torch.Tensor:
    # The collectives run in place with no backward (a Megatron backward would need its own conjugate collectives
    # around the column-parallel layers): refuse rather than return wrong gradients.
    if t.requires_grad:
        raise RuntimeError("tensor-parallel StableLM is inference-only: call it under torch.no_grad() or "
                           "torch.inference_mode() (generate() does)")
    return t


class RowParallelLinear(nn.Module):
    """A linear layer holding K / tp of the input columns: local partial product, all-reduce (sum), then the
    bias once. `local` is an nn.Linear or QuantLinear over this rank's columns."""

    def __init__(self, local: nn.Module, group=None):
        super().__init__()
        self.group = group
        bias = local.bias
        # In a world of one the sum is a copy: the bias stays in the local product (its epilogue rounds once),
        # so TP=1 computes exactly what the plain model does.
        if dist.get_world_size(group) > 1:
            local.bias = None
        else:
            bias = None
        self.local = local
        if isinstance(bias, nn.Parameter):
            self.bias = bias
        else:
            self.register_buffer("bias", bias)

    def forward(self, x):
        out = _inference_only(self.local(x))
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


class _TiedRows(nn.Module):
    """This rank's rows of a tied head: a view of the replicated embedding table (no copy)."""

    def __init__(self, embed: nn.Embedding, rows: range):
        super().__init__()
        self.register_buffer("weight", embed.weight.detach()[rows.start:rows.stop], persistent=False)

    def forward(self, x):
        return ops.linear(x, self.weight)  # the plain model's tied head runs the same op


class VocabParallelHead(nn.Module):
    """The lm_head over this rank's vocabulary rows, its logits all-gathered: every rank returns the whole
    [..., vocab_size] logits, identical on every rank."""

    def __init__(self, local: nn.Module, vocab_size: int, chunk: int, group=None):
        super().__init__()
        self.local, self.vocab_size, self.chunk, self.group = local, vocab_size, chunk, group

    def forward(self, x):
        part = _inference_only(self.local(x))
        if part.shape[-1] < self.chunk:  # the last rank's short chunk, padded so every rank sends the same size
            part = F.pad(part, (0, self.chunk - part.shape[-1]))
        part = part.contiguous()
        size = dist.get_world_size(self.group)
        out = part.new_empty((size * part.shape[0],) + tuple(part.shape[1:]))
        _all_gather(out, part, group=self.group)  # [size * B, ..., chunk], rank-major
        out = out.view(size, *part.shape).movedim(0, -2).reshape(*part.shape[:-1], size * self.chunk)
        return out[..., :self.vocab_size]


# ---------------------------------------------------------------- reading a shard
def read_shard(source, shard: Shard, cfg: StableLMConfig, quant: dict | None) -> dict:
    """This rank's tensors (project names, local shapes): from a safetensors file, reading only its slices, or
    from a dict of full tensors (copied, so the full ones can be freed)."""
    out = {}
    if isinstance(source, dict):
        for name, t in source.items():
            rule = shard.slices(name, cfg, quant)
            out[name] = t if rule is None else torch.cat([t.narrow(rule[0], a, b - a) for a, b in rule[1]],
                                                         rule[0])  # a new tensor: the full one can go
        return out
    path = Path(source)
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                rule = shard.slices(name, cfg, quant)
                if rule is None:
                    out[name] = f.get_tensor(name)
                    continue
                part = f.get_slice(name)
                dim, ranges = rule
                pieces = [part[a:b] if dim == 0 else part[:, a:b] for a, b in ranges]
                out[name] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
    except FileNotFoundError:
        raise
    except Exception as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors weight file ({e})") from e
    return out


def _local_model(rcfg: RankConfig, shard: Shard, quant: dict | None) -> StableLM:
    """The rank's StableLM on the meta device, quantized as `load` quantizes, its head cut to its vocab rows."""
    with torch.device("meta"):
        model = StableLM(rcfg)
    if quant:
        quantize_model(model, **quantize_kwargs(quant))  # the head too when the checkpoint quantized it
    if model.lm_head is not None:
        # The project's Linear (ops.linear), as the plain model's head: the same kernel, hence at TP=1 the same
        # logits bit for bit (cuBLAS and the decode GEMV round differently).
        head = Linear(rcfg.hidden_size, len(shard.vocab), bias=False, device="meta")
        if isinstance(model.lm_head, QuantLinear):
            head = QuantLinear.from_linear(head, model.lm_head.bits, model.lm_head.group_size)
        model.lm_head = head
    return model


def load_sharded(cfg: StableLMConfig, quant: dict | None, source, *, tp: int, device="cpu", dtype=None,
                 what: str = "checkpoint") -> StableLM:
    """This rank's tensor-parallel StableLM: `source` is a converted model.safetensors (read by slices) or a dict
    of the full project-layout tensors. Joins the process group (init_distributed); tp must be its world size.
    dtype: a torch dtype or None (as stored); quantization scales / zeros keep theirs."""
    if cfg.architecture != "StableLmForCausalLM":
        raise ValueError(f"tensor parallelism runs the causal LM only; {what} is {cfg.architecture}")
    device = init_distributed(device)
    world, r = dist.get_world_size(), dist.get_rank()
    if tp != world:
        raise ValueError(f"tp={tp} but this process group has {world} rank(s): launch with "
                         f"`torchrun --nproc-per-node {tp} ...` (or --nnodes/--nproc-per-node giving {tp} in all)")
    shard = Shard.of(cfg, r, tp, quant)
    rcfg = shard.config(cfg)
    model = _local_model(rcfg, shard, quant)
    tensors = read_shard(source, shard, cfg, quant)
    check_tensors(tensors, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                  f"{what} (tensor-parallel rank {r} of {tp})")
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() and not (quant and k.endswith((".scales", ".zeros")))
                   else v for k, v in tensors.items()}
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, assign=True, strict=True)
    model.rotary = Rotary(rcfg).to(device)  # its non-persistent table was built on the meta device
    match_embedding_dtype(model)  # a quantized table's lookups come out in the loaded floats' dtype
    for block in model.layers:
        block.attn.o = RowParallelLinear(block.attn.o)
        block.mlp.down = RowParallelLinear(block.mlp.down)
    local_head = model.lm_head if model.lm_head is not None else _TiedRows(model.embed, shard.vocab)
    model.lm_head = VocabParallelHead(local_head, cfg.vocab_size, shard.vocab_chunk)
    return model.eval()
