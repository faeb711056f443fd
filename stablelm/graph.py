"""Building a decode step: replayed from a CUDA graph, compiled by torch.compile, or run eagerly.

A step is a function of no arguments over static buffers (the token ids fed back, the KV cache, the selection
state of generate's DecodeSession): every shape is fixed and the write position / positions / attention lengths
are read on the device from `cache.lengths`, which the step itself advances. So one recording serves every call
of the same (batch, cache length), and a builder turns `run` into the callable the session replays:

  EagerBuilder      run itself (the CPU, and `cuda_graph=False`)
  CUDAGraphBuilder  run captured in one CUDA graph (the default on CUDA)
  CompileBuilder    torch.compile(run), by default captured in one CUDA graph (the gpt-fast recipe: inductor
                    kernels replayed from a CUDA graph)

`GraphDecodeStep` is the forward-only step (tokens -> logits) captured on first call, for code that drives a
cache by hand.
"""
from __future__ import annotations

import torch

from .cache import KVCache


def capture(run, reset, generators=()):
    """Capture `run()` in a CUDA graph and return (graph, run's output held by the graph).

    Two warm-up runs on a side stream come first (they also trigger Triton compilation and autotuning, which
    cannot happen during capture); `reset()` undoes each run's side effects on state such as a KV cache.
    Capture records kernels without running them, but host-side bookkeeping did run, so `reset()` follows it
    too. `generators` (CUDA torch.Generator) are registered with the graph so random ops inside it draw fresh
    numbers on every replay and follow the generator's seed (set it with manual_seed between replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
            reset()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        out = run()
    reset()
    return graph, out


class EagerBuilder:
    """The step runs as written, op by op."""

    name = "eager"

    def build(self, run, reset, generators=(), static=()):
        return run


class CUDAGraphBuilder:
    """The step captured once in a CUDA graph; each call is one replay returning the graph's output buffers."""

    name = "cuda-graph"

    def build(self, run, reset, generators=(), static=()):
        graph, out = capture(run, reset, generators)

        def replay():
            graph.replay()
            return out
        replay.graph = graph
        return replay


class CompileBuilder:
    """The step compiled by torch.compile: inductor's kernels, then by default captured in one CUDA graph here.

    capture=True (the default, CUDA only; mode must not bring inductor's own CUDA graphs): a few warm-up calls
    compile the step, then `capture` records the compiled step like CUDAGraphBuilder records the eager one, and
    each call is one replay. This is the gpt-fast recipe (inductor kernels replayed from a CUDA graph) with the
    graph taken here, as serving engines take theirs: inductor's own "reduce-overhead" CUDA graphs skip this step
    on torch 2.11 ("skipping cudagraphs due to mutated inputs": the KV-cache writes, although the cache is
    marked static; bench/NOTES_decode.md), which leaves a compiled step launched op by op from Python.
    capture=False runs the compiled step directly, e.g. with mode="reduce-overhead" where inductor does keep its
    graphs: `static` tensors (the KV cache and the session's buffers, mutated by every step) are marked as static
    addresses, and each call marks a new cudagraph-trees step (outputs of the previous call may be overwritten,
    which the session allows: it copies what it keeps)."""

    def __init__(self, mode: str | None = None, backend: str = "inductor", fullgraph: bool = False,
                 warmup: int = 3, capture: bool = True):
        if capture and mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"mode={mode!r} brings inductor's own CUDA graphs; capture=True would record them "
                             f"inside another: pass capture=False, or a mode without CUDA graphs")
        self.mode, self.backend, self.fullgraph, self.warmup, self.capture = mode, backend, fullgraph, warmup, capture
        self.name = f"compile-{backend}-{mode or 'default'}" + ("+cuda-graph" if capture else "")

    def build(self, run, reset, generators=(), static=()):
        if self.capture and not all(t.is_cuda for t in static):
            raise ValueError("CompileBuilder(capture=True) records a CUDA graph: the model and cache must be on a "
                             "CUDA device (capture=False compiles without one)")
        for t in static:
            torch._dynamo.mark_static_address(t)
        compiled = torch.compile(run, mode=self.mode, backend=self.backend, fullgraph=self.fullgraph,
                                 dynamic=False)
        if self.capture:
            for _ in range(self.warmup):  # compile (and autotune) before the capture, which cannot
                compiled()
                reset()
            return CUDAGraphBuilder().build(compiled, reset, generators)

        def call():
            torch.compiler.cudagraph_mark_step_begin()
            return compiled()
        for _ in range(self.warmup):
            call()
            reset()
        return call


class GraphDecodeStep:
    """Drop-in for an eager decode step: `step(tokens [B, 1]) -> logits [B, vocab]`, appending to `cache`.

    Captured on first call (after two warm-up runs on a side stream, which also trigger any Triton autotuning);
    later calls copy the new tokens in and replay. One instance serves one (model, cache) pair: the graph holds
    the cache's buffers by address.
    """

    def __init__(self, model, cache: KVCache):
        if cache.device.type != "cuda":
            raise ValueError("CUDA-graph decode needs the model and cache on a CUDA device")
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _run(self):
        return self.model(self.tokens, cache=self.cache, last_only=True)[:, -1]

    def _capture(self) -> None:
        cache = self.cache
        lengths, host = cache.lengths.clone(), list(cache.host_lengths)

        def restore():
            # Warm-up and capture must leave the cache as they found it; the slot they wrote is rewritten by
            # the first real step.
            cache.lengths.copy_(lengths)
            cache.host_lengths = list(host)

        self.graph, self.logits = capture(self._run, restore)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape != self.tokens.shape:
            raise ValueError(f"graph decode step was built for tokens {tuple(self.tokens.shape)}, got "
                             f"{tuple(tokens.shape)}")
        self.cache.check_room(1)
        self.tokens.copy_(tokens)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        self.cache.host_lengths = [n + 1 for n in self.cache.host_lengths]
        return self.logits
