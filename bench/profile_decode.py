"""Where a decode step's time goes: GPU kernels per step grouped by kind, with launch counts and GPU time.

    python -m bench.profile_decode [--batch 1] [--context 128] [--quant int8|int4] [--peer torch-compile]
                                   [--out bench/results/profile_decode_h200.json]

Profiles eager decode steps (the same kernels the CUDA graph replays) with torch.profiler and sums device time
per kernel name. The kernel count per step is what the fusions (LayerNorm + residual, rotary + cache write,
SwiGLU, fused qkv / gate_up matmuls) cut. `--peer torch-compile` profiles bench.decode's gpt-fast-recipe peer
instead: --steps decode steps of its inductor-compiled step (RECIPE_OPS, not captured, so each kernel shows), run
through generate() and a DecodeSession as that peer runs (the prefill is profiled too).
"""
from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import environment, markdown_table, write_json
from bench.decode import RECIPE_OPS
from bench.launch import cases, host_us, measure
from stablelm import StableLM, ops, preset
from stablelm.generate import DecodeSession, generate
from stablelm.graph import CompileBuilder
from stablelm.quantize import quantize_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="stablelm-3b-4e1t")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quant", choices=["int8", "int4"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--peer", choices=["torch-compile"], help="profile this bench.decode peer instead")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cfg = preset(args.preset)
    model = StableLM.random(cfg, device="cuda", dtype=torch.bfloat16)
    if args.quant:
        quantize_model(model, {"int8": 8, "int4": 4}[args.quant], args.group_size)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.context), device="cuda")
    if args.peer:
        return profile_peer(args, model, ids)
    cache = model.make_cache(args.batch, args.context + 2 * args.steps + 2)
    with torch.no_grad():
        tok = model.prefill(cache, ids).argmax(-1, keepdim=True)
        for _ in range(2):
            tok = model(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                tok = model(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
    rows, total, kernels = kernel_rows(prof, args.steps)
    with torch.no_grad():
        # Host cost per op call (bench.launch) and of a whole eager step: what the CUDA graph removes.
        host = measure(cases("cuda", torch.bfloat16))
        step_host, step_wall = host_us(lambda: model(tok, cache=None, last_only=True), n=10)
        host.append(dict(op="whole decode step (no cache)", impl="default", host_us=step_host, wall_us=step_wall))
    print(markdown_table(host, ["op", "impl", "host_us", "wall_us"]))
    return report(args, rows, total, kernels, host=host)


def profile_peer(args, model, ids) -> dict:
    """The gpt-fast-recipe peer's kernels: one generate() call of steps + 1 tokens (a prefill and `steps` decode
    steps) after two that compile, per step."""
    session = DecodeSession(model, builder=CompileBuilder(capture=False, warmup=2))
    mask = torch.ones_like(ids)
    with ops.using(**RECIPE_OPS):
        def call():
            return generate(model, ids, attention_mask=mask, session=session, max_new_tokens=args.steps + 1,
                            stop_ids=[])
        call(), call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
    rows, total, kernels = kernel_rows(prof, args.steps)
    return report(args, rows, total, kernels, peer=args.peer, prefill_included=True)


def kernel_rows(prof, steps: int):
    """(rows of kernel name, launches and GPU µs per step, most time first; µs per step; kernels per step)."""
    time_us, count = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name if len(e.name) < 60 else e.name[:57] + "..."
            time_us[name] += e.device_time_total / steps
            count[name] += 1 / steps
    rows = [dict(kernel=k, per_step=round(count[k], 2), us_per_step=time_us[k]) for k, _ in time_us.most_common()]
    return rows, sum(time_us.values()), sum(count.values())


def report(args, rows, total, kernels, **extra) -> dict:
    what = f"{args.peer} peer" if args.peer else "decode step"
    print(f"# {what}, batch {args.batch}, context {args.context}: {kernels:.0f} kernels, {total:.0f} us of GPU "
          f"time per step")
    print(markdown_table(rows, ["kernel", "per_step", "us_per_step"]))
    payload = dict(benchmark="profile_decode", env=environment(), batch=args.batch, context=args.context,
                   kernels_per_step=kernels, gpu_us_per_step=total, rows=rows, **extra)
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
