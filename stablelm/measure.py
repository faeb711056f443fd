"""Measuring on this machine, shared by check-op (stablelm/oplab.py) and the benchmark scripts (bench/): the
environment record, timing (CUDA events; a CUDA graph of many calls where the host's launch cost must not count),
the machine's copy and read bandwidth and matmul rate that utilisation is a fraction of, and markdown tables."""
from __future__ import annotations

import datetime
import math
import os
import platform
import time

import torch


def environment() -> dict:
    """Date, versions and device of a run, recorded beside its numbers."""
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    for name in ("triton", "transformers"):
        try:
            env[name] = __import__(name).__version__
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


def time_cuda(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds per call of fn(): CUDA events around each call (without CUDA: perf_counter)."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
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
    return sorted(times)[len(times) // 2]


def graph_ms(calls: list, repeats: int = 20, calls_per_graph: int = 32) -> float:
    """Median ms per call of the no-argument callables `calls` (run in order, e.g. one per input copy so the inputs
    do not sit in L2), captured together in one CUDA graph whose replays are timed: no host launch cost. Each is
    run once first, outside the capture (compilation, autotuning), then on a side stream as capture requires."""
    with torch.no_grad():
        for c in calls:
            c()
        torch.cuda.synchronize()
        n = max(calls_per_graph, len(calls))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(n):
                calls[i % len(calls)]()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n):
                calls[i % len(calls)]()
    return time_cuda(graph.replay, warmup=2, iters=repeats) / n


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), graph-timed."""
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    return 2 * src.nbytes / graph_ms([lambda: dst.copy_(src)]) / 1e6


def read_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device read bandwidth in GB/s (a sum over nbytes, reading each byte once and writing one number),
    graph-timed. A decode step reads its weights and writes little, and on some GPUs a copy's mixed read + write
    runs well under the read rate (an H200 on 2026-12-02: copy 2.7 TB/s, bf16 GEMVs reading 3.7 TB/s)."""
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    return src.nbytes / graph_ms([lambda: src.sum(dtype=torch.float32)]) / 1e6


def matmul_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """Dense matmul rate in TFLOP/s on random data, graph-timed."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    out = torch.empty(n, n, device="cuda", dtype=dtype)
    return 2 * n ** 3 / graph_ms([lambda: torch.matmul(a, b, out=out)]) / 1e9


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of rows' values under columns (missing values blank; booleans yes / no; floats to three
    significant digits, whole numbers from 100 up, exponent notation below 1e-3)."""
    def fmt(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            if math.isinf(v) or math.isnan(v):
                return str(v)
            if abs(v) >= 100:
                return f"{v:.0f}"
            return f"{v:.3g}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
