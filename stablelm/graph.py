"""CUDA-graph decode: the whole one-token step (all layers, the cache write, lm_head) replayed as one graph.

The step has static shapes: the token ids live in a fixed device buffer, the KV cache is preallocated and the
write position / positions / attention lengths are read on the device from `cache.lengths`, which the graph
itself advances. Only the host mirror of the lengths (for the overflow check) is updated here after a replay.
"""
from __future__ import annotations

import torch

from .cache import KVCache


def capture(run, reset):
    """Capture `run()` in a CUDA graph and return (graph, run's output held by the graph).

    Two warm-up runs on a side stream come first (they also trigger Triton compilation and autotuning, which
    cannot happen during capture); `reset()` undoes each run's side effects on state such as a KV cache.
    Capture records kernels without running them, but host-side bookkeeping did run, so `reset()` follows it
    too."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
            reset()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    reset()
    return graph, out


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
