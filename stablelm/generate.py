"""Text generation over the static KV cache: greedy, sampling, repetition penalty, stop ids, streaming, beam search,
and the decode session that keeps the cache and the recorded decode steps between calls.

One prefill (`StableLM.prefill`, in pieces of `prefill_chunk` tokens) writes the (left-padded) prompt into a
preallocated `KVCache`, then every new token is one decode step. A `DecodeSession` owns one cache per
(batch, max_len bucket) (max_len rounded up to a multiple of `bucket`) and, per bucket, the steps built for it,
keyed on everything a recording freezes: the op implementations chosen (`ops.use` after a call makes the next
call record again), the weights' storage, the builder (CUDA graph / eager / torch.compile) and the selection
settings. A second `generate()` of a shape seen before records nothing. `generate()` uses a default session per
model (held weakly: it goes with the model); hold one yourself to control it:

    session = DecodeSession(model)
    session.generate(ids, max_new_tokens=64)        # == generate(model, ids, session=session, ...)

Greedy / sampling steps run everything on the device, inside the recorded step: the forward, the logits
processing and the selection (argmax, or sampling as exponential-race argmax(p / Exp(1)) over a device
generator: torch.multinomial's own method, without its host-side checks), the stop-id check, the finished
flags, the non-finite-logits check. The host reads the flags only every `sync_every` steps (the copy of step s
is read at step s + sync_every, so the device never waits for the host), then stops early; the result is the
same as stopping at the first step where every row has finished. A streamer needs each step's tokens on the
host, so with one the flags are read every step.

Selection follows transformers' logits processors, in their order: repetition penalty -> min_new_tokens
(stop ids blocked) -> temperature -> top-k -> top-p (the last three only when sampling). Beam search reproduces
transformers' `_beam_search` (5.x): candidates and finished hypotheses are kept and scored exactly as there,
including its `early_stopping` heuristics and -1e9 masking, so equal logits give equal beams; its forward step is
the session's recorded one, its bookkeeping runs eagerly.

transformers' own argument names are accepted where they mean the same thing (max_length, min_length,
eos_token_id, pad_token_id, num_return_sequences, return_dict_in_generate, output_scores, output_logits,
inputs_embeds); its other arguments are an error naming them, never silently ignored.

One deliberate difference: the repetition penalty counts the prompt's real tokens only. transformers penalises
every id in `input_ids`, left padding included, which makes a row's output depend on its batch neighbours.
With `input_embeds` only generated tokens count (as in transformers, which has no ids for the prompt then).
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import sys
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import ops
from .graph import CUDAGraphBuilder, EagerBuilder
from .model import DEFAULT_PREFILL_CHUNK

# transformers' stand-in for "impossible" in beam scores; the same constant keeps ties and sums identical.
_IMPOSSIBLE = -1.0e9
EARLY_STOPPING = (False, True, "never")
# Cache lengths are rounded up to a multiple of this, so nearby lengths share a recording. Off CUDA nothing is
# recorded and the reference decode attention reads every slot, so the CPU rounds to less.
DEFAULT_BUCKET = {"cuda": 256, "cpu": 64}


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN / inf logits while generating (broken weights or an overflow in this dtype)."""


@dataclass
class GenerationConfig:
    """What to generate and how. `stop_ids=None` means the model config's eos ids; `pad_id=None` means the first
    stop id (0 without stop ids). top_k=0 and top_p=1.0 switch those filters off. `sync_every`: decode steps
    between two reads of the finished / non-finite flags on the host (early stop is exact whatever its value;
    larger wastes more steps after the last row stopped, smaller costs more host round trips)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    stop_ids: tuple[int, ...] | None = None
    pad_id: int | None = None
    seed: int | None = None
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK  # prompt tokens per prefill forward (None: all at once)
    cuda_graph: bool = True  # on CUDA, replay each decode step from a captured CUDA graph
    sync_every: int = 8
    return_dict_in_generate: bool = False  # return a GenerateOutput instead of the token tensor
    output_scores: bool = False  # GenerateOutput.scores: each step's processed scores (greedy / sampling)
    output_logits: bool = False  # GenerateOutput.logits: each step's raw logits (greedy / sampling)

    def __post_init__(self):
        if self.stop_ids is not None:
            ids = [self.stop_ids] if isinstance(self.stop_ids, int) else list(self.stop_ids)
            self.stop_ids = tuple(ids)
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"GenerationConfig.{name}={getattr(self, name)!r}: {why}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad("min_new_tokens", f"must be an integer in [0, max_new_tokens={self.max_new_tokens}]")
        if not isinstance(self.do_sample, bool):
            bad("do_sample", "must be a bool")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            bad("temperature", "must be > 0 (for greedy decoding use do_sample=False)")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = no top-k filter)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1] (1 = no top-p filter)")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0 (1 = no penalty)")
        if not is_int(self.num_beams) or self.num_beams < 1:
            bad("num_beams", "must be an integer >= 1")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            bad("length_penalty", "must be a number")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            bad("early_stopping", f"must be one of {EARLY_STOPPING}")
        if not is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            bad("num_return_sequences", "must be an integer >= 1")
        if self.stop_ids is not None and not all(is_int(i) and i >= 0 for i in self.stop_ids):
            bad("stop_ids", "must be non-negative integer token ids")
        if self.pad_id is not None and (not is_int(self.pad_id) or self.pad_id < 0):
            bad("pad_id", "must be a non-negative integer token id")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer or None")
        if self.prefill_chunk is not None and (not is_int(self.prefill_chunk) or self.prefill_chunk < 1):
            bad("prefill_chunk", "must be an integer >= 1 or None")
        for name in ("cuda_graph", "return_dict_in_generate", "output_scores", "output_logits"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a bool")
        if not is_int(self.sync_every) or self.sync_every < 1:
            bad("sync_every", "must be an integer >= 1")
        if not self.do_sample:
            for name, off in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0)):
                if getattr(self, name) != off:
                    bad(name, "only applies when sampling: set do_sample=True")
        if self.do_sample and self.num_beams > 1:
            bad("num_beams", "beam search is deterministic here; do_sample=True needs num_beams=1")
        if self.num_return_sequences > 1 and not self.do_sample and self.num_beams == 1:
            bad("num_return_sequences", "greedy decoding returns one sequence per prompt: sample (do_sample=True) "
                "or use beam search (num_beams >= num_return_sequences)")
        if self.num_return_sequences > self.num_beams > 1:
            bad("num_return_sequences", f"must be <= num_beams={self.num_beams}")
        if (self.output_scores or self.output_logits) and not self.return_dict_in_generate:
            bad("output_scores" if self.output_scores else "output_logits",
                "needs return_dict_in_generate=True (the scores come back in a GenerateOutput)")
        if (self.output_scores or self.output_logits) and self.num_beams > 1:
            bad("output_scores" if self.output_scores else "output_logits",
                "per-step scores are returned for greedy and sampling only (beam search returns "
                "GenerateOutput.sequences_scores)")

    def replace(self, **overrides) -> "GenerationConfig":
        """A validated copy with some fields changed; unknown names are an error that lists the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown generation options {unknown}; valid options: {sorted(names)}")
        return dataclasses.replace(self, **overrides)


@dataclass
class GenerateOutput:
    """generate(..., return_dict_in_generate=True). `sequences` [B * num_return_sequences, prompt_len + new_len]
    are laid out as transformers' are: each prompt (repeated per returned sequence) followed by its new tokens, which
    are what generate returns otherwise (with inputs_embeds there are no prompt ids: the new tokens alone). `scores` / `logits`: one [B * num_return_sequences, vocab] float32 tensor per new token, the
    processed scores the token was chosen from / the raw logits (transformers' output_scores / output_logits).
    `sequences_scores` (beam search): each returned sequence's length-normalised score, as transformers'."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    sequences_scores: torch.Tensor | None = None


# ---------------------------------------------------------------- logits processing (float32 scores [rows, V])
def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores of already seen tokens divided by `penalty` where positive, multiplied where negative."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def block_ids(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Scores with the given token ids set to -inf (min_new_tokens blocks the stop ids this way)."""
    blocked = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    blocked[ids] = True
    return scores.masked_fill(blocked, -float("inf"))


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep every token scoring at least the k-th best score (ties with it included); the rest -inf."""
    kth = scores.topk(min(k, scores.shape[-1]), dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, -float("inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probability reaches p (always the best one); the rest -inf.

    Summed from the least likely token up, a token is dropped while the mass of it and everything below stays
    within 1 - p: the same arithmetic order as transformers, so the boundary token agrees under rounding.
    """
    ascending, order = scores.sort(dim=-1)
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = mass_below <= 1 - p
    drop[..., -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), -float("inf"))


def sampling_filters(scores: torch.Tensor, cfg) -> torch.Tensor:
    """temperature -> top-k -> top-p, the filters applied only when sampling (cfg: anything with those fields)."""
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k:
        scores = top_k_filter(scores, cfg.top_k)
    if cfg.top_p < 1.0:
        scores = top_p_filter(scores, cfg.top_p)
    return scores


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row drawn from probs [rows, V]: argmax(probs / q) with q ~ Exp(1) is a draw from the
    categorical distribution (the exponential race), torch.multinomial's method for one sample, without its
    host-side validity checks, so it records in a CUDA graph. Same generator state, same tokens."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return probs.div(q).argmax(dim=-1)


class _Processor:
    """Per-step score processing of the beam loop, with the seen-token set it needs."""

    def __init__(self, cfg: GenerationConfig, stop: torch.Tensor, seen: torch.Tensor | None):
        self.cfg, self.stop, self.seen = cfg, stop, seen

    def __call__(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        if self.seen is not None:
            scores = repetition_penalty(scores, self.seen, self.cfg.repetition_penalty)
        if step < self.cfg.min_new_tokens and self.stop.numel():
            scores = block_ids(scores, self.stop)
        return scores

    def add(self, tokens: torch.Tensor, parents: torch.Tensor | None = None) -> None:
        """Record the new tokens [rows] (after moving rows to their `parents` in beam search)."""
        if self.seen is None:
            return
        if parents is not None:
            self.seen = self.seen.index_select(0, parents)
        self.seen.scatter_(1, tokens[:, None], True)


# ---------------------------------------------------------------- the on-device selection step
@dataclass(frozen=True)
class _Selection:
    """What a recorded selection freezes (values the graph holds as constants); stop ids, pad id and
    min_new_tokens live in device buffers instead, so they change between calls without a new recording."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    block_stops: bool  # min_new_tokens > 0

    @classmethod
    def of(cls, cfg: GenerationConfig) -> "_Selection":
        s = cfg.do_sample
        return cls(s, cfg.temperature if s else 1.0, cfg.top_k if s else 0, cfg.top_p if s else 1.0,
                   float(cfg.repetition_penalty), cfg.min_new_tokens > 0)


class _State:
    """Static device buffers of one bucket's greedy / sampling loop; the recorded steps read and write them."""

    def __init__(self, batch: int, max_len: int, vocab: int, device: torch.device):
        def z(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)
        self.tokens = z(batch)  # the token each row feeds back next
        self.out = z(batch, max_len)  # new tokens by step
        self.t = z(1)  # the step being chosen
        self.finished = z(batch, dtype=torch.bool)
        self.done_at = z(batch)  # step at which the row hit a stop id (-1: running)
        self.bad_at = z(batch)  # first step with non-finite logits in a running row (-1: none)
        self.seen = z(batch, vocab, dtype=torch.bool)  # tokens the repetition penalty counts
        self.stop_mask = z(vocab, dtype=torch.bool)
        self.pad = z()
        self.min_new = z(1)
        self.generator = torch.Generator(device=device)

    def tensors(self):
        return [self.tokens, self.out, self.t, self.finished, self.done_at, self.bad_at, self.seen,
                self.stop_mask, self.pad, self.min_new]

    def select(self, logits: torch.Tensor, sel: _Selection):
        """Choose step t's tokens from logits [B, V]; returns (processed scores, raw float32 logits)."""
        raw = logits.float()
        running = ~self.finished
        bad = running & ~torch.isfinite(raw).all(dim=-1)
        self.bad_at.copy_(torch.where(bad & (self.bad_at < 0), self.t, self.bad_at))
        scores = raw
        if sel.repetition_penalty != 1.0:
            scores = repetition_penalty(scores, self.seen, sel.repetition_penalty)
        if sel.block_stops:
            scores = scores.masked_fill(self.stop_mask & (self.t < self.min_new), -float("inf"))
        if sel.do_sample:
            scores = sampling_filters(scores, sel)
            tokens = sample(scores.softmax(dim=-1), self.generator)
        else:
            tokens = scores.argmax(dim=-1)
        tokens = torch.where(self.finished, self.pad, tokens)  # (masked_fill with a device value may sync)
        self.out.index_copy_(1, self.t, tokens[:, None])
        self.tokens.copy_(tokens)
        if sel.repetition_penalty != 1.0:
            self.seen.scatter_(1, tokens[:, None], True)
        hit = self.stop_mask[tokens]
        self.done_at.copy_(torch.where(hit & running, self.t, self.done_at))
        self.finished.logical_or_(hit)
        self.t.add_(1)
        return scores, raw


class _Flags:
    """Two slots of (all finished, any non-finite) copied to the host without waiting; a slot is read one
    period later, when the device has long finished writing it."""

    def __init__(self, state: _State):
        self.state = state
        self.cuda = state.t.is_cuda
        self.host = [torch.zeros(2, dtype=torch.bool, pin_memory=self.cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self.slot = 0

    def post(self) -> int:
        s = self.state
        i, self.slot = self.slot, 1 - self.slot
        self.host[i].copy_(torch.stack([s.finished.all(), (s.bad_at >= 0).any()]), non_blocking=self.cuda)
        if self.cuda:
            self.events[i].record()
        return i

    def read(self, i: int) -> tuple[bool, bool]:
        if self.cuda:
            self.events[i].synchronize()
        done, bad = self.host[i].tolist()
        return done, bad


class _Bucket:
    def __init__(self, model, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.cache = model.make_cache(batch, max_len)
        self.state = _State(batch, max_len, model.config.vocab_size, self.cache.device)
        self.flags = _Flags(self.state)
        self.steps: dict = {}

    def nbytes(self) -> int:
        return self.cache.nbytes() + sum(t.numel() * t.element_size() for t in self.state.tensors())


# ---------------------------------------------------------------- the session
def ops_key(device_type: str) -> tuple:
    """The implementation chosen for every op on this device (name and function: a re-registered name counts
    as a change), and whether kernels launch with PDL (a recording keeps the launch attribute)."""
    return tuple((op, ops.current(op, device_type), ops.get(op, device_type))
                 for op in sorted(ops.CUDA_PREFERENCE)) + (("pdl", ops.pdl()),)


def _weights_key(model) -> tuple:
    """Where every parameter and buffer lives: a recording reads them by address, so a moved, re-cast or
    replaced tensor (model.to, quantize_model) invalidates it; an in-place load_state_dict does not."""
    return tuple((t.data_ptr(), t.dtype, t.device, tuple(t.shape))
                 for t in list(model.parameters()) + list(model.buffers()))


def _free_cuda_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class DecodeSession:
    """Owns the KV caches and the recorded decode steps of one model, reused across generate() calls.

    One cache per (batch, max_len rounded up to a multiple of `bucket`: default 256 on CUDA, 64 on the CPU), at most `max_buckets` of them (the
    least recently used goes first, and on CUDA before a new cache would not fit in free memory). Per bucket, a
    step is built once per key: (kind, selection settings, ops choice, builder), so `ops.use(...)` between calls
    takes effect (a new recording) instead of being silently ignored. `builder` (stablelm.graph) chooses how
    steps are built; None: a CUDA graph on CUDA unless the call says cuda_graph=False, else eager. `builds`
    counts the steps built (recorded) so far, on any device.
    """

    def __init__(self, model, *, builder=None, bucket: int | None = None, max_buckets: int = 4,
                 _weak: bool = False):
        if bucket is None:
            bucket = DEFAULT_BUCKET.get(model.device.type, DEFAULT_BUCKET["cuda"])
        if not isinstance(bucket, int) or bucket < 1 or not isinstance(max_buckets, int) or max_buckets < 1:
            raise ValueError("bucket and max_buckets must be positive integers")
        self._model = weakref.ref(model) if _weak else (lambda: model)
        self.builder, self.bucket, self.max_buckets = builder, bucket, max_buckets
        self.builds = 0
        self._buckets: collections.OrderedDict[tuple[int, int], _Bucket] = collections.OrderedDict()
        self._weights = None
        self._last = None  # (bucket, step) of the last call, for replay()

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the session's model no longer exists")
        return model

    def generate(self, input_ids: torch.Tensor | None = None, **kwargs):
        """generate(self.model, input_ids, session=self, **kwargs)."""
        return generate(self.model, input_ids, session=self, **kwargs)

    def clear(self) -> None:
        """Drop every cache and recorded step (frees their memory)."""
        self._buckets.clear()
        self._last = None

    def buckets(self) -> list[tuple[int, int]]:
        """(batch, max_len) of the caches held, least recently used first."""
        return list(self._buckets)

    def replay(self, steps: int, at: int) -> None:
        """Run `steps` more decode steps of the last call's recorded step, with every cache row starting at
        length `at` (the slots hold whatever they hold): for measuring the step alone, e.g. with CUDA events."""
        if self._last is None:
            raise RuntimeError("replay() needs a generate() call through this session first")
        bucket, step = self._last
        if at < 1 or at + steps > bucket.max_len:
            raise ValueError(f"at={at} + steps={steps} does not fit the bucket's cache of {bucket.max_len} slots")
        cache = bucket.cache
        cache.lengths.fill_(at)
        cache.start.zero_()
        cache.set_host_length(at)
        bucket.state.t.zero_()
        bucket.state.finished.zero_()
        with torch.no_grad():  # as generate() runs it: an eager or compiled step must not record autograd
            for _ in range(steps):
                step()
        cache.set_host_length(at + steps)

    def bucket_len(self, total: int) -> int:
        return -(-total // self.bucket) * self.bucket

    def _builder(self, cfg: GenerationConfig, device: torch.device):
        if self.builder is not None:
            return self.builder
        return CUDAGraphBuilder() if device.type == "cuda" and cfg.cuda_graph else EagerBuilder()

    def _get_bucket(self, batch: int, total: int) -> _Bucket:
        model = self.model
        weights = _weights_key(model)
        if weights != self._weights:
            self.clear()
            self._weights = weights
        key = (batch, self.bucket_len(total))
        if key in self._buckets:
            self._buckets.move_to_end(key)
            return self._buckets[key]
        while len(self._buckets) >= self.max_buckets:
            self._buckets.popitem(last=False)
        device = model.device
        if device.type == "cuda" and self._buckets:
            cfg = model.config
            need = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * key[1] * cfg.head_dim * \
                torch.finfo(model.dtype).bits // 8
            while self._buckets and _free_cuda_bytes(device) < 1.1 * need:
                self._buckets.popitem(last=False)
        self._buckets[key] = bucket = _Bucket(model, *key)
        return bucket

    def _step(self, bucket: _Bucket, kind: str, sel: _Selection | None, builder, device: torch.device):
        """The bucket's step of this kind for the current ops choice, built (recorded) on first use."""
        key = (kind, sel, ops_key(device.type), builder.name)
        step = bucket.steps.get(key)
        if step is not None:
            return step
        # The step reaches the model through the session's reference (weak for a default session), so a
        # recorded step never keeps its model alive.
        model, cache, state = self._model, bucket.cache, bucket.state
        tokens = state.tokens[:, None]
        if kind == "select":
            def run():
                return state.select(model()(tokens, cache=cache, last_only=True)[:, -1], sel)
        else:
            def run():
                return model()(tokens, cache=cache, last_only=True)[:, -1]

        def reset():
            # Warm-up / recording runs leave garbage in slot 0 and the state; each call resets both first.
            cache.reset()
            state.t.zero_()
            state.finished.zero_()

        cache.reset()
        reset()
        gens = (state.generator,) if kind == "select" and sel.do_sample and device.type == "cuda" else ()
        static = cache.buffers() + state.tensors()
        with torch.no_grad():
            step = builder.build(run, reset, generators=gens, static=static)
        self.builds += 1
        bucket.steps[key] = step
        return step


_default_sessions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def default_session(model) -> DecodeSession:
    """The session generate() uses for `model` when none is passed (one per model, gone with the model)."""
    session = _default_sessions.get(model)
    if session is None:
        session = _default_sessions[model] = DecodeSession(model, _weak=True)
    return session


# ---------------------------------------------------------------- transformers' argument names
# transformers generate() arguments that do not exist here, with what to do instead where there is something.
_UNSUPPORTED = {
    "generation_config": "pass config=stablelm.generate.GenerationConfig(...) or the options themselves",
    "logits_processor": "custom logits processors are not supported",
    "stopping_criteria": "use eos_token_id / stop_ids for stop tokens",
    "prefix_allowed_tokens_fn": "constrained decoding is not supported",
    "synced_gpus": "", "assistant_model": "speculative decoding is not supported", "negative_prompt_ids": "",
    "negative_prompt_attention_mask": "", "use_model_defaults": "", "custom_generate": "", "tokenizer": "",
    "max_time": "", "stop_strings": "stop on token ids with eos_token_id / stop_ids",
    "typical_p": "", "epsilon_cutoff": "", "eta_cutoff": "", "min_p": "", "top_h": "",
    "diversity_penalty": "", "num_beam_groups": "", "penalty_alpha": "", "dola_layers": "",
    "encoder_repetition_penalty": "", "no_repeat_ngram_size": "", "bad_words_ids": "", "force_words_ids": "",
    "renormalize_logits": "", "constraints": "", "forced_bos_token_id": "", "forced_eos_token_id": "",
    "remove_invalid_values": "non-finite logits already stop generation with NonFiniteLogitsError",
    "exponential_decay_length_penalty": "", "suppress_tokens": "", "begin_suppress_tokens": "",
    "sequence_bias": "", "token_healing": "", "guidance_scale": "", "watermarking_config": "",
    "low_memory": "", "output_attentions": "", "output_hidden_states": "", "cache_implementation":
    "the cache here is always static (one preallocated buffer per session bucket)", "cache_config": "",
    "compile_config": "decode steps are CUDA graphs already (or DecodeSession(builder=CompileBuilder()))",
    "disable_compile": "", "prompt_lookup_num_tokens": "", "assistant_early_exit": "", "past_key_values":
    "the session keeps the cache", "decoder_input_ids": "", "bos_token_id": "", "decoder_start_token_id": "",
    "num_assistant_tokens": "", "length_normalization": "", "return_legacy_cache": "",
}


def _from_transformers(kwargs: dict, cfg: GenerationConfig, prompt_len: int) -> dict:
    """Config overrides for transformers-named arguments (popped from kwargs); errors for the ones not here."""
    over = {}
    for ours, theirs in (("stop_ids", "eos_token_id"), ("pad_id", "pad_token_id")):
        if theirs in kwargs:
            if ours in kwargs:
                raise TypeError(f"pass {ours} or transformers' {theirs}, not both")
            value = kwargs.pop(theirs)
            # transformers: an explicit eos_token_id=None generates to the length limit.
            over[ours] = () if ours == "stop_ids" and value is None else value
    if kwargs.pop("use_cache", True) is not True:
        raise ValueError("use_cache=False is not supported: generation always decodes over the KV cache")
    for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if total not in kwargs:
            continue
        if new in kwargs:
            raise TypeError(f"pass {new} or {total} (prompt + new tokens), not both")
        value = kwargs.pop(total)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{total}={value!r} must be an integer (prompt + new tokens)")
        if total == "max_length":
            if value <= prompt_len:
                raise ValueError(f"max_length={value} leaves no room for new tokens after the {prompt_len}-token "
                                 f"prompt (max_length counts prompt + new tokens; or pass max_new_tokens)")
            over["max_new_tokens"] = value - prompt_len
        else:
            over["min_new_tokens"] = max(0, value - prompt_len)
    if "min_new_tokens" in over:
        limit = over.get("max_new_tokens", kwargs.get("max_new_tokens", cfg.max_new_tokens))
        over["min_new_tokens"] = min(over["min_new_tokens"], limit)
    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    for name in list(kwargs):
        if name in names:
            over[name] = kwargs.pop(name)
    if kwargs:
        name = sorted(kwargs)[0]
        if name in _UNSUPPORTED:
            hint = _UNSUPPORTED[name]
            raise TypeError(f"generate() does not support transformers' argument {name!r}"
                            + (f": {hint}" if hint else ""))
        close = difflib.get_close_matches(name, sorted(names | {"max_length", "min_length", "eos_token_id",
                                                                "pad_token_id", "inputs_embeds"}), n=1)
        raise TypeError(f"generate() got an unexpected keyword argument {name!r}"
                        + (f"; did you mean {close[0]!r}?" if close else f"; options: {sorted(names)}"))
    return over


# ---------------------------------------------------------------- entry point
@torch.no_grad()
def generate(model, input_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
             input_embeds: torch.Tensor | None = None, config: GenerationConfig | None = None,
             streamer: Callable[[torch.Tensor], None] | None = None, session: DecodeSession | None = None,
             progress: bool = False, **kwargs) -> torch.Tensor | GenerateOutput:
    """New tokens [B * num_return_sequences, new_len] for a batch of prompts; rows that stopped early are padded
    with pad_id (a GenerateOutput with return_dict_in_generate=True).

    input_ids [B, S] (left padded, with attention_mask [B, S]) or input_embeds [B, S, hidden] (+ mask), on the
    model's device. `kwargs` change fields of `config` (e.g. max_new_tokens=32), under their names here or
    transformers' (max_length, eos_token_id, ...). `streamer(tokens [B])` is called once per step with that
    step's tokens (pad_id for finished rows); beam search cannot stream. `session`: the DecodeSession whose cache
    and recorded steps to use (default: the model's own). `progress` shows a tqdm bar on stderr.
    """
    if "inputs_embeds" in kwargs:
        if input_embeds is not None:
            raise TypeError("pass input_embeds or transformers' inputs_embeds, not both")
        input_embeds = kwargs.pop("inputs_embeds")
    cfg = config or GenerationConfig()
    device = model.device
    batch, prompt_len, mask = _check_prompt(model, input_ids, attention_mask, input_embeds, device)
    cfg = cfg.replace(**_from_transformers(kwargs, cfg, prompt_len))
    vocab = model.config.vocab_size
    if cfg.stop_ids is None:
        cfg = cfg.replace(stop_ids=tuple(model.config.eos_token_id))
    if cfg.pad_id is None:
        cfg = cfg.replace(pad_id=cfg.stop_ids[0] if cfg.stop_ids else 0)
    for name, ids in (("stop_ids", cfg.stop_ids), ("pad_id", (cfg.pad_id,))):
        if any(i >= vocab for i in ids):
            raise ValueError(f"{name}={getattr(cfg, name)} outside the model's vocabulary [0, {vocab})")
    if streamer is not None and cfg.num_beams > 1:
        raise ValueError("streaming needs num_beams=1: beam search only knows the best sequence at the end")
    beams = cfg.num_beams
    total, limit = prompt_len + cfg.max_new_tokens, model.config.max_position_embeddings
    if total > limit and model.config.rope_type == "default":
        # Without rope scaling, positions past the trained range give garbage rather than an error.
        raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens={cfg.max_new_tokens} does not fit the "
                         f"model: {total} > max_position_embeddings={limit}")

    # Beam search prefills every beam's copy of the prompt so the whole batch lives in one static cache;
    # sampling several sequences per prompt prefills each copy the same way.
    copies = beams if beams > 1 else cfg.num_return_sequences
    expand = (lambda t: t.repeat_interleave(copies, dim=0)) if copies > 1 else (lambda t: t)
    rows = batch * copies
    prompt = dict(input_ids=None if input_ids is None else expand(input_ids),
                  input_embeds=None if input_embeds is None else expand(input_embeds),
                  attention_mask=None if mask is None else expand(mask))
    session = session or default_session(model)
    if session.model is not model:
        raise ValueError("the session belongs to another model")
    bucket = session._get_bucket(rows, total)
    builder = session._builder(cfg, device)
    sel = None if beams > 1 else _Selection.of(cfg)
    step = session._step(bucket, "forward" if beams > 1 else "select", sel, builder, device)
    session._last = (bucket, step)

    cache = bucket.cache
    cache.reset()
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device)
        ids = prompt["input_ids"]
        if ids is not None:
            # Padding goes to the extra column, which is dropped: only real prompt tokens count as seen.
            real = ids if mask is None else ids.masked_fill(prompt["attention_mask"] == 0, vocab)
            seen.scatter_(1, real, True)
        seen = seen[:, :vocab]
    logits = model.prefill(cache, **prompt, chunk=cfg.prefill_chunk)
    bar = tqdm(total=cfg.max_new_tokens, desc="generate", unit="tok", file=sys.stderr, disable=not progress,
               leave=False)
    try:
        if beams > 1:
            stop = torch.tensor(cfg.stop_ids, dtype=torch.long, device=device)
            if seen is not None:
                seen = seen.clone()
            out = _beam_search(step, bucket, logits, cfg, _Processor(cfg, stop, seen), batch, prompt_len, bar)
        else:
            out = _sample(step, bucket, logits, cfg, sel, seen, prompt_len, streamer, bar)
    finally:
        bar.close()
    if isinstance(out, GenerateOutput) and input_ids is not None:
        # transformers' `sequences` start with the prompt (repeated per returned sequence); code copied from its
        # docs slices them at the prompt length, so the dict form keeps that layout.
        prompts = input_ids.to(out.sequences.device).repeat_interleave(cfg.num_return_sequences, dim=0)
        out = dataclasses.replace(out, sequences=torch.cat([prompts, out.sequences], dim=1))
    return out


def _check_prompt(model, input_ids, attention_mask, input_embeds, device):
    """(batch, prompt_len, mask or None) after checking shapes, devices, ids and the padding side."""
    if (input_ids is None) == (input_embeds is None):
        raise ValueError("pass exactly one of input_ids or input_embeds")
    prompt = input_ids if input_ids is not None else input_embeds
    name = "input_ids" if input_ids is not None else "input_embeds"
    if input_ids is not None:
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
    elif input_embeds.dim() != 3:
        raise ValueError(f"input_embeds must be [batch, seq, hidden], got shape {tuple(input_embeds.shape)}")
    batch, prompt_len = prompt.shape[:2]
    if batch == 0 or prompt_len == 0:
        raise ValueError(f"{name} is empty (shape {tuple(prompt.shape)}): generation needs at least one token")
    if prompt.device != device:
        raise ValueError(f"{name} is on {prompt.device} but the model is on {device}")
    if input_ids is not None:
        lo, hi = input_ids.min().item(), input_ids.max().item()
        if lo < 0 or hi >= model.config.vocab_size:
            raise ValueError(f"input_ids hold ids in [{lo}, {hi}] outside the vocabulary "
                             f"[0, {model.config.vocab_size})")
    if attention_mask is None:
        return batch, prompt_len, None
    if attention_mask.shape != (batch, prompt_len):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != {name} (batch, seq) = "
                         f"{(batch, prompt_len)}")
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
    if not bool((attention_mask[:, -1] == 1).all()):
        raise ValueError("attention_mask must be left padded for generation: every row's last position must be a "
                         "real token (1)")
    return batch, prompt_len, attention_mask


def _non_finite(step: int, rows: list[int]) -> NonFiniteLogitsError:
    return NonFiniteLogitsError(
        f"the model's logits became non-finite (NaN or inf) at new token {step} in batch rows {rows}: the weights "
        f"hold NaN/inf or the activations overflowed in this dtype (stablelm.load checks weights; try bfloat16 or "
        f"float32)")


# ---------------------------------------------------------------- greedy / sampling
def _sample(step, bucket: _Bucket, logits, cfg: GenerationConfig, sel: _Selection, seen, prompt_len: int,
            streamer, bar):
    state, cache, flags = bucket.state, bucket.cache, bucket.flags
    n_new = cfg.max_new_tokens
    state.t.zero_()
    state.finished.zero_()
    state.done_at.fill_(-1)
    state.bad_at.fill_(-1)
    state.pad.fill_(cfg.pad_id)
    state.min_new.fill_(cfg.min_new_tokens)
    state.stop_mask.zero_()
    if cfg.stop_ids:
        state.stop_mask[torch.tensor(cfg.stop_ids, device=state.stop_mask.device)] = True
    if seen is not None:
        state.seen.copy_(seen)
    if cfg.do_sample:
        if cfg.seed is None:
            state.generator.seed()
        else:
            state.generator.manual_seed(cfg.seed)
    keep_scores, keep_logits = cfg.output_scores, cfg.output_logits
    scores_seq, logits_seq = [], []

    def record(out):
        if keep_scores:
            scores_seq.append(out[0].clone())
        if keep_logits:
            logits_seq.append(out[1].clone())
        bar.update(1)
        if streamer is not None:
            streamer(state.tokens.clone())

    record(state.select(logits, sel))  # the first new token, from the prefill's logits
    done = 1
    pending = None
    while done < n_new:
        if streamer is not None:
            finished, bad = flags.read(flags.post())  # the streamer reads every step on the host anyway
            if finished or bad:
                break
        elif done % cfg.sync_every == 0:
            # Post this step's flags, then read the ones posted a period ago: the device is past them by now.
            previous, pending = pending, flags.post()
            if previous is not None:
                finished, bad = flags.read(previous)
                if finished or bad:
                    break
        out = step()
        done += 1
        cache.set_host_length(prompt_len + done - 1)
        record(out)

    bad_at = state.bad_at.tolist()
    if max(bad_at) >= 0:
        first = min(s for s in bad_at if s >= 0)
        raise _non_finite(first, [r for r, s in enumerate(bad_at) if s == first])
    done_at = state.done_at.tolist()
    length = max(done_at) + 1 if min(done_at) >= 0 else done
    tokens = state.out[:, :length].clone()
    if not cfg.return_dict_in_generate:
        return tokens
    return GenerateOutput(tokens, tuple(scores_seq[:length]) if keep_scores else None,
                          tuple(logits_seq[:length]) if keep_logits else None)


# ---------------------------------------------------------------- beam search
def _beam_search(forward, bucket: _Bucket, logits, cfg: GenerationConfig, process: _Processor, batch: int,
                 prompt_len: int, bar):
    """transformers' beam search: each step keeps the K = max(2, 1 + #stop ids) * beams best continuations, the
    best `beams` unfinished ones run on, and those among the top `beams` that hit a stop id (or the length limit)
    compete, length-normalised, for the `beams` finished slots. Returns each input's best finished sequence(s)."""
    cache, fed = bucket.cache, bucket.state.tokens
    beams, vocab, n_new = cfg.num_beams, logits.shape[-1], cfg.max_new_tokens
    device, lp, es = logits.device, cfg.length_penalty, cfg.early_stopping
    k = max(2, 1 + len(cfg.stop_ids)) * beams
    top_beams = torch.arange(k, device=device) < beams
    offsets = torch.arange(batch, device=device)[:, None] * beams

    run_tokens = torch.full((batch, beams, n_new), cfg.pad_id, dtype=torch.long, device=device)
    run_scores = torch.zeros(batch, beams, device=device)
    run_scores[:, 1:] = _IMPOSSIBLE  # all beams start equal: only the first may expand at step 0
    done_tokens = run_tokens.clone()
    done_scores = torch.full((batch, beams), _IMPOSSIBLE, device=device)
    done_len = torch.zeros(batch, beams, dtype=torch.long, device=device)
    is_done = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)

    for t in range(n_new):
        raw = logits.float()
        bad = ~torch.isfinite(raw).all()
        log_probs = process(F.log_softmax(raw, dim=-1), t)
        totals = (log_probs.view(batch, beams, vocab) + run_scores[:, :, None]).view(batch, beams * vocab)
        cand_scores, flat = totals.topk(k, dim=-1)
        parent, tokens = flat // vocab, flat % vocab
        cand_tokens = run_tokens.gather(1, parent[:, :, None].expand(batch, k, n_new))
        cand_tokens[:, :, t] = tokens
        hits = torch.isin(tokens, process.stop) | (t + 1 == n_new)

        # The best `beams` candidates that did not stop run on.
        live_scores = cand_scores + hits.to(torch.float32) * _IMPOSSIBLE
        keep = live_scores.topk(beams, dim=-1).indices
        run_tokens = cand_tokens.gather(1, keep[:, :, None].expand(batch, beams, n_new))
        run_scores = live_scores.gather(1, keep)
        rows = (parent.gather(1, keep) + offsets).view(-1)

        # Stopped candidates among the top `beams` enter the finished set if they beat its members.
        just_done = hits & top_beams
        scores = cand_scores / ((t + 1) ** lp)
        scores = scores + (is_done.all(-1, keepdim=True) & (es is True)).to(torch.float32) * _IMPOSSIBLE
        scores = scores + (~improvable).to(torch.float32) * _IMPOSSIBLE
        scores = scores + (~just_done) * _IMPOSSIBLE
        merged = torch.cat([done_scores, scores], dim=1)
        best = merged.topk(beams, dim=-1).indices
        done_scores = merged.gather(1, best)
        done_tokens = torch.cat([done_tokens, cand_tokens], 1).gather(1, best[:, :, None].expand(batch, beams, n_new))
        done_len = torch.cat([done_len, torch.full_like(tokens, t + 1)], 1).gather(1, best)
        is_done = torch.cat([is_done, just_done], 1).gather(1, best)
        bar.update(1)

        # Could any running beam still beat the worst finished one? (transformers' heuristic, per input.)
        length = n_new if es == "never" and lp > 0 else t + 1
        best_running = run_scores[:, :1] / (length ** lp)
        worst_done = torch.where(is_done, done_scores.min(dim=1, keepdim=True).values, _IMPOSSIBLE)
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        go_on = improvable.any() & ~(is_done.all() & (es is True)) & ~hits.all()
        go_on, bad = torch.stack([go_on, bad]).tolist()  # beam search decides on the host every step
        if bad:
            raise _non_finite(t, [r for r in range(batch * beams) if not bool(torch.isfinite(raw[r]).all())])
        if not go_on:
            break
        next_tokens = run_tokens[:, :, t].reshape(-1)
        cache.reorder(rows)
        process.add(next_tokens, rows)
        fed.copy_(next_tokens)
        logits = forward()
        cache.set_host_length(prompt_len + t + 1)

    n = cfg.num_return_sequences
    length = int(done_len[:, :n].max())
    tokens = done_tokens[:, :n, :length].reshape(batch * n, length)
    if not cfg.return_dict_in_generate:
        return tokens
    return GenerateOutput(tokens, sequences_scores=done_scores[:, :n].reshape(-1))
