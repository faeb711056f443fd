"""End-to-end decode step with kernels/gemv.py in place of cuBLAS / the tiled quant kernel, same process, same
weights: StableLM-3B shape, random weights, CUDA-graph decode step (stablelm.graph.GraphDecodeStep).

    python -m bench.gemv_decode [--tuned gemv_sweep.json] [--batches 1,8,32] [--out gemv_decode.json]

bf16: every nn.Linear is swapped for a module calling the linear op's "triton" implementation (the same as
ops.using(linear="triton") now that the model's Linear layers call ops.linear; bench/gemv_wired.py measures it that
way); int8 / int4 (group 128): quant_linear "tiled"
(the tiled kernel at every M) vs "triton" (kernels.gemv where kernels.gemv.prefer_gemv says, else tiled).
--tuned loads the best configs of a bench.gemv_sweep JSON into kernels.gemv.TUNED first.
"""
from __future__ import annotations

import argparse
import gc
import json

import torch
from torch import nn

from bench.common import copy_bandwidth_gbs, environment, markdown_table, time_cuda, weight_bytes, write_json
from kernels import gemv as G
from kernels import quant as Q
from stablelm import StableLM, ops, preset
from stablelm.graph import GraphDecodeStep


def step_bytes(model, batch, context) -> int:
    """Weights a step reads (bench.common.weight_bytes) + the bf16 KV read."""
    cfg = model.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * batch * (context + 1)
    return weight_bytes(model) + kv


def graph_decode_ms(model, batch, context, steps):
    """ms per CUDA-graph decode step after prefilling `context` random tokens (greedy, argmax fed back)."""
    cache = model.make_cache(batch, context + 2 * steps + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    with torch.no_grad():
        token = model.prefill(cache, ids).argmax(-1, keepdim=True)
        step = GraphDecodeStep(model, cache)
        step(token)

        def run():
            t = token
            for _ in range(steps):
                t = step(t).argmax(-1, keepdim=True)
        return time_cuda(run, warmup=0, iters=1) / steps


class _GemvLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return G.linear_triton(x, self.weight, self.bias)


def load_tuned(path):
    try:
        rows = json.load(open(path))["rows"]
    except (OSError, ValueError) as e:
        print(f"no tuned configs ({e}): heuristic tiling", flush=True)
        return 0
    for r in rows:
        if r.get("best_cfg"):
            G.TUNED[(r["bits"], r["M"], r["N"], r["K"])] = tuple(r["best_cfg"])
    G.choose_config.cache_clear()
    return len(G.TUNED)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tuned")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.tuned:
        print("tuned configs:", load_tuned(args.tuned), flush=True)
    cfg = preset("stablelm-3b-4e1t")
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for fmt in args.formats.split(","):
        gc.collect()
        torch.cuda.empty_cache()
        model = StableLM.random(cfg, device="cuda", dtype=torch.bfloat16)
        if fmt != "bf16":
            try:
                from stablelm.quantize import quantize_model
            except ImportError:
                quantize_model = Q.quantize_model
            quantize_model(model, {"int8": 8, "int4": 4}[fmt], 128)
            impls = {"tiled": dict(quant_linear="tiled"), "gemv": dict(quant_linear="triton")}
            swap = None
        else:
            impls = {"cublas": {}, "gemv": {}}
            swap = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        for impl, choice in impls.items():
            if swap is not None and impl == "gemv":
                for name, m in swap:
                    parent, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(parent), attr, _GemvLinear(m))
            for batch in [int(b) for b in args.batches.split(",")]:
                context = 128 if batch == 1 else 512
                with ops.using(**choice):
                    ms = graph_decode_ms(model, batch, context, args.steps)
                row = dict(format=fmt, impl=impl, batch=batch, context=context, ms_per_step=ms,
                           tokens_per_s=batch * 1e3 / ms,
                           bw_util=step_bytes(model, batch, context) / (ms * 1e-3) / (copy_gbs * 1e9))
                rows.append(row)
                print(row, flush=True)
        del model
    base = {(r["format"], r["batch"]): r for r in rows if r["impl"] in ("cublas",)}
    for r in rows:
        b = base.get(("bf16", r["batch"]))
        r["speedup_vs_bf16_cublas"] = b["ms_per_step"] / r["ms_per_step"] if b else None
    cols = ["format", "impl", "batch", "context", "ms_per_step", "tokens_per_s", "bw_util", "speedup_vs_bf16_cublas"]
    print(markdown_table(rows, cols))
    if args.out:
        write_json(args.out, dict(benchmark="gemv_decode", env=environment(), copy_bandwidth_gbs=copy_gbs,
                                  steps=args.steps, rows=rows))


if __name__ == "__main__":
    main()
