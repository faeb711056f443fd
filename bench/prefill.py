"""Prefill benchmark: tokens/s and MFU of the prompt pass, against transformers (eager and sdpa).

    python -m bench.prefill [--seqs 512,1024,2048,4096] [--batch 1] [--out bench/results/prefill_h200.json]
    python -m bench.prefill --tiny       # small random model on the CPU

The prompt is written into a static KV cache and only the last position's logits are computed, as `generate`
does (transformers gets logits_to_keep=1). MFU = model FLOPs (2 x linear weights x tokens + causal attention)
/ time / the measured bf16 matmul rate of this GPU. The "stablelm-graph" row replays the same prefill from a
CUDA graph: the difference to the eager row is the host's (Python + launch) share of the time.
"""
from __future__ import annotations

import argparse

import torch

from bench.common import bench_device, environment, markdown_table, matmul_tflops, time_cuda, write_json
from bench.decode import build_hf
from stablelm import StableLM, preset
from stablelm.graph import capture


def prefill_flops(cfg, batch, seq) -> float:
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    per_token = L * (H * qkv + H * H + 2 * H * I + I * H)
    linear = 2 * per_token * batch * seq + 2 * H * cfg.vocab_size * batch  # lm_head on the last token only
    attention = 2 * 2 * L * cfg.num_attention_heads * cfg.head_dim * batch * seq * seq / 2
    return linear + attention


def graphed_prefill(model, cache, ids):
    """A replay function for the prefill of `ids` into `cache` captured in a CUDA graph."""
    def run():
        cache.lengths.zero_()
        model.prefill(cache, ids)

    cache.reset()
    graph, _ = capture(run, cache.reset)
    return graph.replay


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--preset", default="stablelm-3b-4e1t")
    ap.add_argument("--seqs", default="512,1024,2048,4096")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cuda, device, dtype = bench_device(ap, args.tiny)
    cfg = preset("tiny") if args.tiny else preset(args.preset)
    seqs = [16, 64] if args.tiny else [int(s) for s in args.seqs.split(",")]
    peak = matmul_tflops() if cuda else None
    model = StableLM.random(cfg, device=device, dtype=dtype)
    B = args.batch
    rows = []

    def record(impl, seq, ms):
        row = dict(impl=impl, batch=B, seq=seq, ms=ms, tokens_per_s=B * seq * 1e3 / ms)
        if peak:
            row["tflops"] = prefill_flops(cfg, B, seq) / ms / 1e9
            row["mfu"] = row["tflops"] / peak
        rows.append(row)
        print(markdown_table([row], list(row)).splitlines()[-1], flush=True)
        return row

    ours = {}
    with torch.no_grad():
        for seq in seqs:
            cache = model.make_cache(B, seq)
            ids = torch.randint(0, cfg.vocab_size, (B, seq), device=device)

            def run():
                cache.reset()
                model.prefill(cache, ids)
            ours[seq] = record("stablelm", seq, time_cuda(run, warmup=2, iters=5))
            if cuda:
                record("stablelm-graph", seq, time_cuda(graphed_prefill(model, cache, ids), warmup=2, iters=5))
        if not args.no_hf:
            for attn in ("sdpa", "eager"):
                hf = build_hf(model, attn)
                for seq in seqs:
                    ids = torch.randint(0, cfg.vocab_size, (B, seq), device=device)
                    row = record(f"transformers-{attn}", seq,
                                 time_cuda(lambda: hf(ids, use_cache=True, logits_to_keep=1), warmup=2, iters=5))
                    row["speedup_of_stablelm"] = row["ms"] / ours[seq]["ms"]
                del hf
    columns = ["impl", "batch", "seq", "ms", "tokens_per_s", "tflops", "mfu", "speedup_of_stablelm"]
    print()
    print(markdown_table(rows, columns))
    payload = {"benchmark": "prefill", "env": environment(), "model": "tiny" if args.tiny else args.preset,
               "dtype": str(dtype), "matmul_peak_tflops": peak, "rows": rows}
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
