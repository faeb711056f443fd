"""Building a decode step: replayed from a CUDA graph, compiled by torch.compile, or run eagerly.

A step is a function of no arguments over static buffers (the token ids fed back, the KV cache, the selection
state of generate's DecodeSession): every shape is fixed and the write position / positions / attention lengths
are read on the device from `cache.lengths`, which the step itself advances. So one recording serves every call
of the same (batch, cache length), and a builder turns `run` into the callable the session replays:

  EagerBuilder      run itself (the CPU, and `cuda_graph=False`)
  CUDAGraphBuilder  run captured in one CUDA graph (the default on CUDA)
  CompileBuilder    torch.compile(run), e.g. mode="reduce-overhead" (the gpt-fast recipe: inductor kernels
                    replayed through its own CUDA graphs)

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
    """The step compiled by torch.compile (default mode "reduce-overhead": inductor kernels in CUDA graphs).

    `static` tensors (the KV cache and the session's buffers, mutated by every step) are marked as static
    addresses so the compiled CUDA graphs read and write them in place. A few warm-up calls compile and record
    the graph outside the timed calls; each call marks a new cudagraph-trees step (outputs of the previous call
    may be overwritten, which the session allows: it copies what it keeps)."""

    def __init__(self, mode: str | None = "reduce-overhead", backend: str = "inductor", fullgraph: bool = False,
                 warmup: int = 3):
        self.mode, self.backend, self.fullgraph, self.warmup = mode, backend, fullgraph, warmup
        self.name = f"compile-{backend}-{mode}"

    def build(self, run, reset, generators=(), static=()):
        for t in static:
            torch._dynamo.mark_static_address(t)
        compiled = torch.compile(run, mode=self.mode, backend=self.backend, fullgraph=self.fullgraph,
                                 dynamic=False)

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
