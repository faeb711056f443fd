"""Shared pieces of the benchmark scripts: the device choice, L2-flushed timing, input copies, JSON. The
environment record, CUDA-event / CUDA-graph timing, the copy bandwidth / matmul peak and the tables are
stablelm/measure.py's (check-op measures with the same ones), re-exported here for the scripts."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

from stablelm.measure import (copy_bandwidth_gbs, environment, graph_ms, markdown_table, matmul_tflops,
                              read_bandwidth_gbs, time_cuda)

__all__ = ["bench_device", "bench_ms", "copies_for", "copy_bandwidth_gbs", "environment", "graph_calls_ms", "graph_ms",
           "markdown_table", "matmul_tflops", "read_bandwidth_gbs", "resident_bytes", "time_cuda", "weight_bytes",
           "write_json"]


def resident_bytes(model) -> int:
    """Bytes of every tensor the model keeps on the device (the whole embedding table included)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def weight_bytes(model) -> int:
    """Bytes of every weight a StableLM decode step reads: all but the embedding table (float or quantized), of
    which one row per token is read (unless it doubles as the tied lm_head), and the rotary tables."""
    total = resident_bytes(model)
    if model.lm_head is not None:
        total -= resident_bytes(model.embed)
    return total - sum(b.numel() * b.element_size() for b in model.rotary.buffers())


def bench_device(ap, tiny: bool):
    """(cuda, device, dtype) of a benchmark run: bf16 on the GPU, or a float32 --tiny smoke run on the CPU."""
    cuda = torch.cuda.is_available() and not tiny
    if not cuda and not tiny:
        ap.error("the full benchmark needs a GPU; use --tiny on the CPU")
    return (True, "cuda", torch.bfloat16) if cuda else (False, "cpu", torch.float32)


def bench_ms(call, input_sets, warmup=10, rep=50) -> float:
    """Median ms of call(*inputs) (triton's do_bench: CUDA events, L2 flushed before each call), cycling over
    input_sets so consecutive calls touch different memory."""
    from triton.testing import do_bench
    cycle = itertools.cycle(input_sets)
    return do_bench(lambda: call(*next(cycle)), warmup=warmup, rep=rep, return_mode="median")


def graph_calls_ms(call, input_sets, rep_ms: float = 15.0) -> float:
    """Median ms per call of call(*inputs) over input_sets (e.g. rotated weight copies that together overflow L2),
    the calls captured in order in one CUDA graph whose replays are timed (bench_ms): the device time of calls as a
    decode step's graph runs them, without host launch cost. Runs each call once eagerly first (compilation)."""
    for inputs in input_sets:
        call(*inputs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for inputs in input_sets:
            call(*inputs)
    ms = bench_ms(graph.replay, [()], warmup=3, rep=rep_ms) / len(input_sets)
    del graph
    return ms


def copies_for(nbytes: int) -> int:
    """How many input copies to rotate over so that together they do not fit in L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(16, math.ceil(3 * l2 / max(nbytes, 1))))


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(path)
    except BaseException:  # interrupted or failed: no half-written temporary left behind
        tmp.unlink(missing_ok=True)
        raise
