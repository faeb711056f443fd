"""Host cost per call: what a small, GPU-trivial call of each op costs the CPU, our Triton kernels against torch.

    python -m bench.launch [--out bench/results/launch_h200.json] [--profile "layer_norm + residual"]

Eager decode and short prefills are host-bound: the GPU finishes each kernel before Python has issued the next.
This measures, at tiny shapes, the host microseconds per call (time to enqueue N calls) and the wall time per
call once the GPU has caught up, for each op implementation and for an empty Triton kernel with 1 and 8
pointer arguments (the launcher's own floor). A CUDA graph replays the GPU work with none of this host cost,
which is why the decode step runs in one (stablelm/graph.py).
"""
from __future__ import annotations

import argparse
import time

import torch
import triton

from bench.common import environment, markdown_table, write_json
from stablelm import ops


@triton.jit
def _empty1(A):
    pass


@triton.jit
def _empty8(A, B, C, D, E, F, G, H):
    pass


def host_us(fn, n: int = 200) -> tuple[float, float]:
    """(host µs per call to enqueue, wall µs per call including the GPU catching up)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def cases(dev, dt):
    """name -> {impl: zero-arg callable}, all at decode-step shapes (batch 1, one token, StableLM-3B heads)."""
    B, H, D, R, T, hidden = 1, 32, 80, 20, 256, 2560
    q, k, v = (torch.randn(B, 1, H, D, device=dev, dtype=dt) for _ in range(3))
    cos, sin = torch.randn(B, 1, R // 2, device=dev), torch.randn(B, 1, R // 2, device=dev)
    kc, vc = torch.randn(B, H, T, D, device=dev, dtype=dt), torch.randn(B, H, T, D, device=dev, dtype=dt)
    pos = torch.full((B,), 10, device=dev, dtype=torch.int32)
    kv_len = pos + 1
    x, res = torch.randn(B, 1, hidden, device=dev, dtype=dt), torch.randn(B, 1, hidden, device=dev, dtype=dt)
    w, b = torch.randn(hidden, device=dev, dtype=dt), torch.randn(hidden, device=dev, dtype=dt)
    gate, up = torch.randn(B, 1, 6912, device=dev, dtype=dt), torch.randn(B, 1, 6912, device=dev, dtype=dt)
    qa, ka, va = (torch.randn(B, H, 16, D, device=dev, dtype=dt) for _ in range(3))
    lin = torch.randn(hidden, hidden, device=dev, dtype=dt)
    calls = {
        "rotary_cache": lambda f: f(q, k, v, cos, sin, kc, vc, pos),
        "decode_attention": lambda f: f(q[:, 0], kc, vc, kv_len),
        "attention (16 tokens)": lambda f: f(qa, ka, va),
        "layer_norm + residual": lambda f: f(x, w, b, 1e-5, res),
        "swiglu": lambda f: f(gate, up),
    }
    ops_of = {"rotary_cache": "rotary_cache", "decode_attention": "decode_attention",
              "attention (16 tokens)": "attention", "layer_norm + residual": "layer_norm", "swiglu": "swiglu"}
    table = {name: {impl: (lambda c=call, fn=ops.implementation(ops_of[name], impl): c(fn))
                    for impl in ("torch", "triton", "sdpa") if impl in ops.available(ops_of[name])}
             for name, call in calls.items()}
    table["matmul 1x2560x2560 (cuBLAS)"] = {"torch": lambda: x @ lin}
    table["empty kernel, 1 pointer"] = {"triton": lambda: _empty1[(1,)](x)}
    table["empty kernel, 8 pointers"] = {"triton": lambda: _empty8[(1,)](x, res, w, b, gate, up, q, k)}
    return table


def measure(table, verbose=False) -> list[dict]:
    """One row per (op, implementation) of a cases() table."""
    rows = []
    for name, impls in table.items():
        for impl, fn in impls.items():
            h, wall = host_us(fn)
            rows.append(dict(op=name, impl=impl, host_us=h, wall_us=wall))
            if verbose:
                print(markdown_table([rows[-1]], list(rows[-1])).splitlines()[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--profile", metavar="OP", help="also print where the host time of OP's Triton call goes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a GPU: host launch cost is a CUDA property")
    table = cases("cuda", torch.bfloat16)
    rows = measure(table, verbose=True)
    print()
    print(markdown_table(rows, ["op", "impl", "host_us", "wall_us"]))
    if args.profile:
        import cProfile
        import pstats
        fn = table[args.profile]["triton"]
        with cProfile.Profile() as prof:
            for _ in range(200):
                fn()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    if args.out:
        write_json(args.out, {"benchmark": "launch", "env": environment(), "rows": rows})


if __name__ == "__main__":
    main()
