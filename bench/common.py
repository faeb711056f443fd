"""Shared pieces of the benchmark scripts: environment record, copy bandwidth / matmul peak, tables, JSON."""
from __future__ import annotations

import datetime
import itertools
import json
import math
import platform
import time
from pathlib import Path

import torch


def environment() -> dict:
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda)
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def bench_device(ap, tiny: bool):
    """(cuda, device, dtype) of a benchmark run: bf16 on the GPU, or a float32 --tiny smoke run on the CPU."""
    cuda = torch.cuda.is_available() and not tiny
    if not cuda and not tiny:
        ap.error("the full benchmark needs a GPU; use --tiny on the CPU")
    return (True, "cuda", torch.bfloat16) if cuda else (False, "cpu", torch.float32)


def time_cuda(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds per call of fn() measured with CUDA events (CPU: perf_counter)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def bench_ms(call, input_sets, warmup=10, rep=50) -> float:
    """Median ms of call(*inputs) (triton's do_bench: CUDA events, L2 flushed before each call), cycling over
    input_sets so consecutive calls touch different memory."""
    from triton.testing import do_bench
    cycle = itertools.cycle(input_sets)
    return do_bench(lambda: call(*next(cycle)), warmup=warmup, rep=rep, return_mode="median")


def graph_ms(call, input_sets, calls_per_graph=32) -> float:
    """Median ms per call of call(*inputs) without the host's launch cost: the calls (cycling over input_sets)
    are captured in one CUDA graph whose replays are timed. For kernels of a few microseconds, where Python
    launch overhead would otherwise be what is measured; the decode step runs the same way (stablelm.graph)."""
    for inputs in input_sets:  # compile / autotune outside the capture
        call(*inputs)
    torch.cuda.synchronize()
    n = max(calls_per_graph, len(input_sets))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            call(*input_sets[i % len(input_sets)])
    return bench_ms(graph.replay, [()], warmup=3, rep=30) / n


def copies_for(nbytes: int) -> int:
    """How many input copies to rotate over so that together they do not fit in L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(16, math.ceil(3 * l2 / max(nbytes, 1))))


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / bench_ms(lambda: dst.copy_(src), [()]) / 1e6


def matmul_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """Measured dense matmul rate (TFLOP/s) on random data."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_cuda(lambda: a @ b, warmup=3, iters=10)
    return 2 * n**3 / ms / 1e9


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
