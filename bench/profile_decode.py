"""Where a decode step's time goes: GPU kernels per step grouped by kind, with launch counts and GPU time.

    python -m bench.profile_decode [--batch 1] [--context 128] [--out bench/results/profile_decode_h200.json]

Profiles eager decode steps (the same kernels the CUDA graph replays) with torch.profiler and sums device time
per kernel name. The kernel count per step is what the fusions (LayerNorm + residual, rotary + cache write,
SwiGLU, fused qkv / gate_up matmuls) cut.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import environment, markdown_table, write_json
from stablelm import StableLM, ops, preset


def host_costs(model, cache, tok, calls=200):
    """Host microseconds per call of each op at decode size, launched back to back (the GPU work is tiny,
    so this is the Python + launch cost that a CUDA graph removes)."""
    cfg = model.config
    B, H, Hkv, D = tok.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = torch.randn(B, 1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(B, 1, H + 2 * Hkv, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
    cos = torch.randn(B, 1, cfg.rotary_dim // 2, device="cuda")
    gu = torch.randn(B, 1, 2 * cfg.intermediate_size, device="cuda", dtype=torch.bfloat16)
    ln = model.layers[0].ln1
    lin = model.layers[0].attn.qkv
    kv_len = cache.lengths + 1
    cases = {
        "layer_norm+residual": lambda: ops.layer_norm(x, ln.weight, ln.bias, 1e-5, residual=x),
        "rotary_cache": lambda: ops.rotary_cache(q, k, v, cos, cos, cache.k[0], cache.v[0], cache.lengths),
        "decode_attention": lambda: ops.decode_attention(q[:, 0], cache.k[0], cache.v[0], kv_len, cache.start),
        "swiglu": lambda: ops.swiglu(*gu.split(cfg.intermediate_size, dim=-1)),
        "qkv linear (cuBLAS)": lambda: lin(x),
        "whole decode step": lambda: model(tok, cache=None, last_only=True),
    }
    rows = []
    for name, fn in cases.items():
        n = calls if name != "whole decode step" else 10
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        rows.append(dict(op=name, host_us_per_call=host))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="stablelm-3b-4e1t")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cfg = preset(args.preset)
    model = StableLM.random(cfg, device="cuda", dtype=torch.bfloat16)
    cache = model.make_cache(args.batch, args.context + 2 * args.steps + 2)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.context), device="cuda")
    with torch.no_grad():
        tok = model(ids, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        for _ in range(2):
            tok = model(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                tok = model(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
    time_us, count = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name if len(e.name) < 60 else e.name[:57] + "..."
            time_us[name] += e.device_time_total / args.steps
            count[name] += 1 / args.steps
    rows = [dict(kernel=k, per_step=round(count[k], 2), us_per_step=time_us[k]) for k, _ in time_us.most_common()]
    total = sum(time_us.values())
    with torch.no_grad():
        host = host_costs(model, cache, tok)
    print(markdown_table(host, ["op", "host_us_per_call"]))
    print(f"# decode step, batch {args.batch}, context {args.context}: {sum(count.values()):.0f} kernels, "
          f"{total:.0f} us of GPU time per step")
    print(markdown_table(rows, ["kernel", "per_step", "us_per_step"]))
    payload = dict(benchmark="profile_decode", env=environment(), batch=args.batch, context=args.context,
                   kernels_per_step=sum(count.values()), gpu_us_per_step=total, rows=rows,
                   host=host)
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
