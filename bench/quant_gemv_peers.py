"""Weight-only GEMVs of one decode step against the kernels a user could pick instead, at the StableLM-3B shapes and
M = 1 / 8 / 32 rows: cuBLAS bf16, this project's "triton" quant_linear (int8, int4 g128: at one row it is
tinygemm over the repacked weight, kernels/int4pack.py) and its tiled Triton int4 kernel, torch's tinygemm int4
(torch._weight_int4pack_mm at each inner-k tiling) and torch's int8 pack mm (torch._weight_int8pack_mm). One line per
(shape, kernel, M) with the time per call and the fraction of the copy bandwidth, then the totals of one step (32
layers' four projections + the lm_head) per kernel and M: what kernels/int4pack.py's routing rests on.

    python -m bench.quant_gemv_peers [--out bench/results/quant_gemv_peers_h200.json]

Timing as bench/gemv_sweep.py: the calls over rotated weight copies (together >= 4x L2) in one CUDA graph, replays
timed (median). Bytes counted: weight (+ scales / zeros) + x + out. tinygemm times random codes in its own layout
(a speed figure; tests/test_int4pack.py checks the repacked weights' results).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth_gbs, environment, graph_calls_ms, markdown_table, write_json
from bench.gemv_sweep import SHAPES
from kernels.quant import quant_linear_tiled, quant_linear_triton, quantize_weight

GROUP = 128
LAYERS = 32  # StableLM-3B: each projection runs once per layer, the lm_head once per step


def variants(N, K):
    """name -> (weight tensors, call(x, *tensors)) for one shape."""
    w = torch.randn(N, K, device="cuda") * K ** -0.5
    q8 = quantize_weight(w, 8)
    q4 = quantize_weight(w, 4, GROUP)
    out = {"bf16-cublas": ((w.bfloat16(),), lambda x, a: F.linear(x, a)),
           "int8-stablelm": (q8, lambda x, a, s, z: quant_linear_triton(x, a, s, z, None, 8, GROUP)),
           "int4-stablelm": (q4, lambda x, a, s, z: quant_linear_triton(x, a, s, z, None, 4, GROUP)),
           "int4-stablelm-tiled": (q4, lambda x, a, s, z: quant_linear_tiled(x, a, s, z, None, 4, GROUP)),
           "int8-aten-pack": ((q8[0], q8[1].bfloat16()), lambda x, a, s: torch._weight_int8pack_mm(x, a, s))}
    for tiles in (2, 4, 8):
        codes = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8)
        packed = torch._convert_weight_to_int4pack(codes, tiles)
        pairs = torch.randn(K // GROUP, N, 2, device="cuda", dtype=torch.bfloat16) * 0.01
        out[f"int4-tinygemm-k{tiles}"] = ((packed, pairs),
                                          lambda x, a, s: torch._weight_int4pack_mm(x, a, GROUP, s))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--ms", default="1,8,32")
    ap.add_argument("--rep-ms", type=float, default=15.0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a GPU")
    ms_list = [int(v) for v in args.ms.split(",")]
    copy = copy_bandwidth_gbs()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"copy bandwidth {copy:.0f} GB/s", flush=True)
    rows, totals = [], {}
    for name, (N, K) in SHAPES.items():
        for kernel, (tensors, call) in variants(N, K).items():
            wbytes = sum(t.nbytes for t in tensors if t is not None)
            copies = max(2, min(64, math.ceil(4 * l2 / wbytes)))
            sets = [tensors] + [tuple(None if t is None else t.clone() for t in tensors) for _ in range(copies - 1)]
            for M in ms_list:
                if kernel == "int8-aten-pack" and M > 1:  # 20x slower than the others at one row already
                    continue
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                try:
                    us = 1e3 * graph_calls_ms(call, [(x, *s) for s in sets], args.rep_ms)
                except Exception as e:  # an aten kernel this build lacks: recorded, not fatal
                    rows.append(dict(shape=name, kernel=kernel, M=M, error=f"{type(e).__name__}: {str(e)[:200]}"))
                    continue
                frac = (wbytes + 2 * M * (N + K)) / (us * 1e-6) / (copy * 1e9)
                rows.append(dict(shape=name, kernel=kernel, M=M, us=us, copy_frac=frac))
                totals[(kernel, M)] = totals.get((kernel, M), 0.0) + us * (1 if name == "lm_head" else LAYERS)
                print(f"{name:8s} {kernel:18s} M={M:2d} {us:8.2f} us {100 * frac:5.1f}% of copy", flush=True)
            del sets
    step = [dict(kernel=k, M=M, step_us=us) for (k, M), us in sorted(totals.items(), key=lambda kv: (kv[0][1], kv[1]))]
    print(markdown_table(step, ["kernel", "M", "step_us"]))
    if args.out:
        write_json(args.out, dict(benchmark="quant_gemv_peers", env=environment(), copy_bandwidth_gbs=copy,
                                  group_size=GROUP, rows=rows, step_totals=step))


if __name__ == "__main__":
    main()
