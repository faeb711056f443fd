"""Text generation over the static KV cache: greedy, sampling, repetition penalty, stop ids, streaming, beam search.

One prefill (`StableLM.prefill`, in pieces of `prefill_chunk` tokens) writes the (left-padded) prompt into a
preallocated `KVCache`, then every new token is one call of a decode step `step(tokens [B, 1]) -> logits [B, vocab]`.
The step is built by `step_factory(model, cache)`: by default `GraphDecodeStep` (the whole step replayed from a
CUDA graph) on CUDA unless `cuda_graph=False`, else `DecodeStep` (eager); any class with that constructor and call
signature can stand in. The loop never keeps a step's logits past the next call and reorders the cache in
place, so a step may return a static buffer.

Selection follows transformers' logits processors, in their order: repetition penalty -> min_new_tokens
(stop ids blocked) -> temperature -> top-k -> top-p (the last three only when sampling). Beam search reproduces
transformers' `_beam_search` (5.x): candidates and finished hypotheses are kept and scored exactly as there,
including its `early_stopping` heuristics and -1e9 masking, so equal logits give equal beams.

One deliberate difference: the repetition penalty counts the prompt's real tokens only. transformers penalises
every id in `input_ids`, left padding included, which makes a row's output depend on its batch neighbours.
With `input_embeds` only generated tokens count (as in transformers, which has no ids for the prompt then).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cache import KVCache
from .graph import GraphDecodeStep
from .model import DEFAULT_PREFILL_CHUNK

# transformers' stand-in for "impossible" in beam scores; the same constant keeps ties and sums identical.
_IMPOSSIBLE = -1.0e9
EARLY_STOPPING = (False, True, "never")


@dataclass
class GenerationConfig:
    """What to generate and how. `stop_ids=None` means the model config's eos ids; `pad_id=None` means the first
    stop id (0 without stop ids). top_k=0 and top_p=1.0 switch those filters off."""

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
    stop_ids: tuple[int, ...] | None = None
    pad_id: int | None = None
    seed: int | None = None
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK  # prompt tokens per prefill forward (None: all at once)
    cuda_graph: bool = True  # on CUDA, replay each decode step from a captured CUDA graph

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
        if self.stop_ids is not None and not all(is_int(i) and i >= 0 for i in self.stop_ids):
            bad("stop_ids", "must be non-negative integer token ids")
        if self.pad_id is not None and (not is_int(self.pad_id) or self.pad_id < 0):
            bad("pad_id", "must be a non-negative integer token id")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer or None")
        if self.prefill_chunk is not None and (not is_int(self.prefill_chunk) or self.prefill_chunk < 1):
            bad("prefill_chunk", "must be an integer >= 1 or None")
        if not isinstance(self.cuda_graph, bool):
            bad("cuda_graph", "must be a bool")
        if not self.do_sample:
            for name, off in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0)):
                if getattr(self, name) != off:
                    bad(name, "only applies when sampling: set do_sample=True")
        if self.do_sample and self.num_beams > 1:
            bad("num_beams", "beam search is deterministic here; do_sample=True needs num_beams=1")

    def replace(self, **overrides) -> "GenerationConfig":
        """A validated copy with some fields changed; unknown names are an error that lists the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown generation options {unknown}; valid options: {sorted(names)}")
        return dataclasses.replace(self, **overrides)


def default_step_factory(device: torch.device, cfg: GenerationConfig):
    """GraphDecodeStep on CUDA (unless cfg.cuda_graph is False), DecodeStep elsewhere."""
    return GraphDecodeStep if torch.device(device).type == "cuda" and cfg.cuda_graph else DecodeStep


class DecodeStep:
    """The eager one-token step: `step(tokens [B, 1]) -> logits [B, vocab]`, appending the tokens to `cache`.

    The seam for CUDA graphs: any class built as `cls(model, cache)` with this call signature can be passed to
    `generate(step_factory=...)`.
    """

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, cache=self.cache, last_only=True)[:, -1]


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


def sampling_filters(scores: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """temperature -> top-k -> top-p, the filters applied only when sampling."""
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k:
        scores = top_k_filter(scores, cfg.top_k)
    if cfg.top_p < 1.0:
        scores = top_p_filter(scores, cfg.top_p)
    return scores


class _Processor:
    """Per-step score processing shared by the sampling and beam loops, with the seen-token set it needs."""

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


# ---------------------------------------------------------------- entry point
@torch.no_grad()
def generate(model, input_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
             input_embeds: torch.Tensor | None = None, config: GenerationConfig | None = None,
             streamer: Callable[[torch.Tensor], None] | None = None, step_factory=None,
             progress: bool = False, **overrides) -> torch.Tensor:
    """New tokens [B, new_len] for a batch of prompts; rows that stopped early are padded with pad_id.

    input_ids [B, S] (left padded, with attention_mask [B, S]) or input_embeds [B, S, hidden] (+ mask), on the
    model's device. `overrides` change fields of `config` (e.g. max_new_tokens=32). `streamer(tokens [B])` is
    called once per step with that step's tokens (pad_id for finished rows); beam search cannot stream.
    `step_factory(model, cache)` builds the decode step (default: default_step_factory). `progress` shows a tqdm
    bar on stderr.
    """
    cfg = (config or GenerationConfig()).replace(**overrides)
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

    device = model.embed.weight.device
    batch, prompt_len, mask = _check_prompt(model, input_ids, attention_mask, input_embeds, device)
    beams = cfg.num_beams
    total, limit = prompt_len + cfg.max_new_tokens, model.config.max_position_embeddings
    if total > limit and model.config.rope_type == "default":
        # Without rope scaling, positions past the trained range give garbage rather than an error.
        raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens={cfg.max_new_tokens} does not fit the "
                         f"model: {total} > max_position_embeddings={limit}")
    cache = model.make_cache(batch * beams, total)

    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
        if input_ids is not None:
            # Padding goes to the extra column, which is dropped: only real prompt tokens count as seen.
            real = input_ids if mask is None else input_ids.masked_fill(mask == 0, vocab)
            seen.scatter_(1, real, True)
        seen = seen[:, :vocab].repeat_interleave(beams, dim=0)
    stop = torch.tensor(cfg.stop_ids, dtype=torch.long, device=device)
    process = _Processor(cfg, stop, seen)

    # Beam search prefills every beam's copy of the prompt so the whole batch lives in one static cache.
    expand = (lambda t: t.repeat_interleave(beams, dim=0)) if beams > 1 else (lambda t: t)
    prompt = dict(input_ids=None if input_ids is None else expand(input_ids),
                  input_embeds=None if input_embeds is None else expand(input_embeds),
                  attention_mask=None if mask is None else expand(mask))
    logits = model.prefill(cache, **prompt, chunk=cfg.prefill_chunk)
    step = (step_factory or default_step_factory(device, cfg))(model, cache)
    bar = tqdm(total=cfg.max_new_tokens, desc="generate", unit="tok", file=sys.stderr, disable=not progress,
               leave=False)
    try:
        if beams > 1:
            return _beam_search(step, cache, logits, cfg, process, batch, bar)
        return _sample(step, logits, cfg, process, batch, streamer, bar)
    finally:
        bar.close()


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


# ---------------------------------------------------------------- greedy / sampling
def _sample(step, logits, cfg: GenerationConfig, process: _Processor, batch: int, streamer, bar) -> torch.Tensor:
    device = logits.device
    generator = None
    if cfg.do_sample:
        generator = torch.Generator(device=device)
        if cfg.seed is None:
            generator.seed()
        else:
            generator.manual_seed(cfg.seed)
    out = torch.full((batch, cfg.max_new_tokens), cfg.pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for t in range(cfg.max_new_tokens):
        if t:
            logits = step(tokens[:, None])
        scores = process(logits.float(), t)
        if cfg.do_sample:
            probs = sampling_filters(scores, cfg).softmax(dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            tokens = scores.argmax(dim=-1)
        tokens = tokens.masked_fill(finished, cfg.pad_id)
        out[:, t] = tokens
        bar.update(1)
        if streamer is not None:
            streamer(tokens)
        process.add(tokens)
        finished |= torch.isin(tokens, process.stop)
        if bool(finished.all()):
            break
    return out[:, :t + 1]


# ---------------------------------------------------------------- beam search
def _beam_search(step, cache: KVCache, logits, cfg: GenerationConfig, process: _Processor, batch: int,
                 bar) -> torch.Tensor:
    """transformers' beam search: each step keeps the K = max(2, 1 + #stop ids) * beams best continuations, the
    best `beams` unfinished ones run on, and those among the top `beams` that hit a stop id (or the length limit)
    compete, length-normalised, for the `beams` finished slots. Returns each input's best finished sequence."""
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
        log_probs = process(F.log_softmax(logits.float(), dim=-1), t)
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
        if not bool(go_on):
            break
        next_tokens = run_tokens[:, :, t].reshape(-1)
        cache.reorder(rows)
        process.add(next_tokens, rows)
        logits = step(next_tokens[:, None])

    length = int(done_len[:, 0].max())
    return done_tokens[:, 0, :length]
