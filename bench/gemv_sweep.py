"""Skinny-matmul sweep on the GPU: kernels/gemv.py configs vs cuBLAS (bf16) and the tiled quant kernel (int8/int4)
at the StableLM-3B decode shapes, batch (M) 1..64. One line per (shape, format, M) with the best config, its time,
speedup over the baseline and fraction of the copy bandwidth measured in the same run.

    python -m bench.gemv_sweep [--out bench/results/gemv_h200.json] [--ms 1,4,16,64] [--bits 16,8,4] [--quick]

Timing: the calls over rotated weight copies (together >= 4x L2) are captured in one CUDA graph whose replays are
timed (bench.common.bench_ms over the graph's replays: CUDA events, median, L2 flushed before each replay), as
the decode step runs them.
Bytes counted: weight (+ scales / zeros) + x + out. Triton compilation is spread over worker processes first
(they fill the on-disk kernel cache), so the sweep itself only times.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (7680, 2560), "o": (2560, 2560), "gate_up": (13824, 2560), "down": (2560, 6912),
          "lm_head": (50304, 2560)}
GROUP = 128

# (block_n, block_k, num_warps[, num_stages]) candidates per format for M == 1 (CUDA-core kernel)
FMA = {
    16: [(8, 256, 4), (8, 512, 4), (16, 256, 4), (16, 512, 4), (4, 1024, 4), (16, 512, 8), (8, 512, 4, 4)],
    8: [(16, 256, 4), (16, 512, 4), (32, 256, 4), (32, 512, 4), (8, 1024, 4), (32, 512, 8), (16, 512, 4, 4)],
    4: [(32, 128, 4), (64, 128, 4), (128, 128, 4), (64, 64, 4), (128, 128, 8), (256, 128, 8), (64, 128, 4, 4)],
}
# (block_n, block_k, num_warps) for M >= 2 (tensor-core kernel; block_m = max(16, next_pow2(M)) up to 64)
DOT = [(32, 128, 4), (64, 64, 4), (64, 128, 4), (32, 256, 4), (128, 128, 8)]
SPLITS_FEW_ROWS = (1, 2, 4)  # tried when N <= 2560 (few programs without a K split)


def candidates(N, M, bits):
    from kernels.gemv import GemvConfig
    out = []
    splits = SPLITS_FEW_ROWS if N <= 2560 else (1,)
    if M <= 4:
        for c in FMA[bits] if M == 1 else FMA[bits][:4]:
            bn, bk, w = c[:3]
            st = c[3] if len(c) > 3 else 2
            for s in splits:
                out.append(GemvConfig(1, bn, bk, s, w, st))
    if M >= 2 or bits == 4:
        bm = min(64, max(16, 1 << (M - 1).bit_length()))
        for bn, bk, w in DOT:
            if bits == 4 and bk > GROUP:
                continue
            for s in splits:
                out.append(GemvConfig(bm, bn, bk, s, w, 2))
    return out


def make_weights(N, K, bits, device, seed=0):
    from kernels.quant import quantize_weight
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(N, K, device=device, generator=g, dtype=torch.float32) * 0.02
    if bits == 16:
        return (w.to(torch.bfloat16), None, None)
    return quantize_weight(w, bits, GROUP)


def nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _compile_worker(jobs):
    """Run each (name, bits, M, cfg) once so its kernel lands in the on-disk Triton cache."""
    from kernels.gemv import gemv
    torch.cuda.set_device(0)
    cache = {}
    done = 0
    for name, bits, M, cfg in jobs:
        N, K = SHAPES[name]
        if (name, bits) not in cache:
            cache[(name, bits)] = make_weights(N, K, bits, "cuda")
        w, s, z = cache[(name, bits)]
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        try:
            gemv(x, w, s, z, None, bits, GROUP, config=cfg)
            done += 1
        except Exception as e:  # reported again (and recorded) by the timing pass
            print(f"compile failed {name} {bits} {M} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    torch.cuda.synchronize()
    return done


def precompile(jobs, workers):
    """Spread the distinct kernel variants over processes; jobs sharing a compile key go to one worker."""
    import triton
    groups = {}
    for job in jobs:
        name, bits, M, cfg = job
        N, K = SHAPES[name]
        tiles = triton.cdiv(K, cfg.block_k)
        partial = triton.cdiv(K, triton.cdiv(tiles, cfg.split_k) * cfg.block_k) > 1
        key = (bits, M == 1, cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, partial)
        groups.setdefault(key, []).append(job)
    buckets = [[] for _ in range(workers)]
    for i, group in enumerate(sorted(groups.values(), key=len, reverse=True)):
        min(buckets, key=len).extend(group)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        return sum(pool.map(_compile_worker, [b for b in buckets if b])), len(groups)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default="1,2,4,8,16,32,64")
    ap.add_argument("--bits", default="16,8,4")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--rep-ms", type=float, default=15.0)
    args = ap.parse_args()

    from bench.common import copy_bandwidth_gbs, environment, graph_calls_ms, markdown_table, write_json
    from kernels.gemv import gemv
    from kernels.quant import quant_linear_tiled

    ms_list = [int(v) for v in args.ms.split(",")]
    bits_list = [int(v) for v in args.bits.split(",")]
    names = args.shapes.split(",")
    jobs = [(n, b, M, c) for n in names for b in bits_list for M in ms_list for c in candidates(SHAPES[n][0], M, b)]
    t0 = time.time()
    done, kinds = precompile(jobs, args.workers)
    print(f"precompiled {done}/{len(jobs)} calls, {kinds} kernel variants, {time.time() - t0:.0f}s", flush=True)

    env = environment()
    copy_gbs = copy_bandwidth_gbs()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"copy bandwidth {copy_gbs:.0f} GB/s, L2 {l2 >> 20} MiB", flush=True)

    def time_calls(call, sets):
        return graph_calls_ms(call, sets, args.rep_ms)

    rows, best_rows = [], []
    for name in names:
        N, K = SHAPES[name]
        for bits in bits_list:
            w0 = make_weights(N, K, bits, "cuda")
            wbytes = nbytes(w0)
            copies = max(2, min(128, math.ceil(4 * l2 / wbytes)))
            weights = [w0] + [make_weights(N, K, bits, "cuda", seed=i + 1) for i in range(copies - 1)]
            for M in ms_list:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                step_bytes = wbytes + 2 * M * (K + N)
                sets = [(x, *w) for w in weights]
                if bits == 16:
                    base_name = "cublas"
                    base = lambda x, w, s, z: F.linear(x, w)  # noqa: E731
                else:
                    base_name = "tiled_quant"
                    base = lambda x, w, s, z: quant_linear_tiled(x, w, s, z, None, bits, GROUP)  # noqa: E731
                base_ms = time_calls(base, sets)
                ref = base(x, *w0).float()
                result = dict(shape=name, N=N, K=K, bits=bits, M=M, baseline=base_name, baseline_us=base_ms * 1e3,
                              baseline_copy_frac=step_bytes / (base_ms * 1e-3) / (copy_gbs * 1e9), configs=[])
                best = None
                for cfg in candidates(N, M, bits):
                    entry = dict(cfg=[cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps,
                                      cfg.num_stages])
                    try:
                        call = lambda x, w, s, z, cfg=cfg: gemv(x, w, s, z, None, bits, GROUP, config=cfg)  # noqa
                        out = call(x, *w0).float()
                        err = ((out - ref).norm() / ref.norm()).item()
                        entry["rel_err_vs_baseline"] = err
                        if not err < 1e-2:
                            entry["error"] = f"mismatch {err:.3g}"
                        else:
                            t = time_calls(call, sets)
                            entry["us"] = t * 1e3
                            if best is None or t * 1e3 < best["us"]:
                                best = entry
                    except Exception as e:
                        entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    result["configs"].append(entry)
                if best is not None:
                    result.update(best_cfg=best["cfg"], best_us=best["us"], speedup=base_ms * 1e3 / best["us"],
                                  best_copy_frac=step_bytes / (best["us"] * 1e-6) / (copy_gbs * 1e9))
                rows.append(result)
                line = {k: result.get(k) for k in ("shape", "bits", "M", "baseline", "baseline_us", "best_us",
                                                     "speedup", "baseline_copy_frac", "best_copy_frac")}
                line["best_cfg"] = str(result.get("best_cfg"))
                best_rows.append(line)
                print(f"{name} bits={bits} M={M}: {base_name} {base_ms * 1e3:.1f} us, best "
                      f"{result.get('best_us', float('nan')):.1f} us {line['best_cfg']}", flush=True)
            del weights, w0
            torch.cuda.empty_cache()
            write_json(args.out, payload(env, copy_gbs, rows, best_rows)) if args.out else None
    cols = ["shape", "bits", "M", "baseline", "baseline_us", "best_us", "speedup", "baseline_copy_frac",
            "best_copy_frac", "best_cfg"]
    print(markdown_table(best_rows, cols))


def payload(env, copy_gbs, rows, table):
    return dict(benchmark="gemv_sweep", env=env, copy_bandwidth_gbs=copy_gbs, group_size=GROUP,
                timing="CUDA-graph replay over rotated weight copies (>= 4x L2), median, per call",
                bytes="weight (+scales/zeros) + x + out", rows=rows, table=table)


if __name__ == "__main__":
    main()
