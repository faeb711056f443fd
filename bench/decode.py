"""Decode benchmark: tokens/s, ms/token, peak VRAM and bandwidth utilisation, against transformers.

    python -m bench.decode [--batch-sizes 1,8,32,64] [--contexts 128,512,1024,2048,4096] [--quant int8|int4]
                           [--out bench/results/decode_h200.json]
    python -m bench.decode --tiny        # small random model on the CPU

StableLM-3B shape with random bf16 weights. Each row: prefill `context` tokens into a static KV cache, then
time `--steps` greedy decode steps (argmax fed back on the device). Bandwidth utilisation = bytes a step must
move (every weight once, the KV cache read up to the context, the new K/V written) / step time / measured
copy bandwidth. Peak VRAM is reported over the whole row (prefill included) and for the decode phase alone,
each as overhead over weights + KV cache. Prefill and decode steps are the ones `generate` uses
(`StableLM.prefill`, `GraphDecodeStep` / `DecodeStep`). transformers' StableLmForCausalLM (eager and sdpa
attention, same weights) runs the same loop with its own cache in the same process.
"""
from __future__ import annotations

import argparse
import gc

import torch

from bench.common import bench_device, copy_bandwidth_gbs, environment, markdown_table, time_cuda, write_json
from stablelm import StableLM, preset
from stablelm.generate import DecodeStep
from stablelm.graph import GraphDecodeStep

KV_BUDGET_FRACTION = 0.5  # skip (batch, context) rows whose cache alone would take more of the GPU's memory


def resident_bytes(model) -> int:
    """Bytes of every tensor the model keeps on the device (the whole embedding table included)."""
    return sum(b.numel() * b.element_size() for b in list(model.parameters()) + list(model.buffers()))


def weight_bytes(model) -> int:
    """Bytes of every weight a decode step reads: all but the embedding table, of which one row per token is
    read (unless it doubles as the tied lm_head), and the rotary tables."""
    total = resident_bytes(model)
    if model.lm_head is not None:
        total -= model.embed.weight.numel() * model.embed.weight.element_size()
    return total - sum(b.numel() * b.element_size() for b in model.rotary.buffers())


def step_bytes(model, cfg, batch, context, elt) -> int:
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elt
    return weight_bytes(model) + batch * kv_per_token * (context + 1)


def ours_decode(model, batch, context, steps, graph: bool):
    cfg = model.config
    device = model.embed.weight.device
    cache = model.make_cache(batch, context + 2 * steps + 8)
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device=device)
    peaks = {}
    with torch.no_grad():
        logits = model.prefill(cache, ids)
        if device.type == "cuda":
            # Peaks of the two phases apart: the prompt's activations vs. the steady decode step.
            peaks["prefill"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        step = (GraphDecodeStep if graph else DecodeStep)(model, cache)
        token = logits.argmax(-1, keepdim=True)
        step(token)  # capture / warm up outside the timed region

        def run():
            t = token
            for _ in range(steps):
                t = step(t).argmax(-1, keepdim=True)
        ms = time_cuda(run, warmup=0, iters=1) / steps
        if device.type == "cuda":
            peaks["decode"] = torch.cuda.max_memory_allocated()
    return ms, cache, peaks


def hf_decode(hf, batch, context, steps):
    from transformers import DynamicCache
    device = next(hf.parameters()).device
    ids = torch.randint(0, hf.config.vocab_size, (batch, context), device=device)
    with torch.no_grad():
        out = hf(ids, use_cache=True, past_key_values=DynamicCache(config=hf.config), logits_to_keep=1)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        def run():
            nonlocal past
            t = token
            for _ in range(steps):
                o = hf(t, past_key_values=past, use_cache=True)
                past = o.past_key_values
                t = o.logits[:, -1].argmax(-1, keepdim=True)
        ms = time_cuda(run, warmup=0, iters=1) / steps
    return ms


def build_hf(model, attn):
    from transformers import StableLmConfig, StableLmForCausalLM

    from stablelm.checkpoint import project_to_hf
    p = model.embed.weight
    config = StableLmConfig(**model.config.to_hf())
    config._attn_implementation = attn
    with torch.device(p.device):
        hf = StableLmForCausalLM(config).to(p.dtype).eval()
    hf.load_state_dict(project_to_hf(model.state_dict(), model.config))
    return hf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke run)")
    ap.add_argument("--preset", default="stablelm-3b-4e1t")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--contexts", default="128,512,1024,2048,4096")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--quant", choices=["int8", "int4"])
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size (tiny: 32)")
    ap.add_argument("--hf-rows", default="1x128,1x512,1x2048,1x4096,8x512,32x512,64x512",
                    help="batch x context rows where transformers also runs ('all' or 'none')")
    ap.add_argument("--no-graph", action="store_true", help="time only the eager decode step")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    cuda, device, dtype = bench_device(ap, args.tiny)
    if args.tiny:
        cfg, batches, contexts, steps = preset("tiny"), [1, 2], [16, 64], 4
    else:
        cfg, steps = preset(args.preset), args.steps
        batches = [int(x) for x in args.batch_sizes.split(",")]
        contexts = [int(x) for x in args.contexts.split(",")]
    env = environment()
    copy_gbs = copy_bandwidth_gbs() if cuda else None
    model = StableLM.random(cfg, device=device, dtype=dtype)
    if args.quant:
        from stablelm.quantize import quantize_model
        group = 32 if args.tiny else args.group_size  # the tiny MLP width (352) is not a multiple of 128
        quantize_model(model, {"int8": 8, "int4": 4}[args.quant], group)
    elt = torch.finfo(dtype).bits // 8
    kv_budget = KV_BUDGET_FRACTION * torch.cuda.get_device_properties(0).total_memory if cuda else float("inf")
    rows = []
    for batch in batches:
        for context in contexts:
            kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elt * batch * context
            if kv > kv_budget:
                continue
            modes = ["eager"] if (args.no_graph or not cuda) else ["graph", "eager"] if batch == 1 else ["graph"]
            for mode in modes:
                if cuda:
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                ms, cache, peaks = ours_decode(model, batch, context, steps, graph=(mode == "graph"))
                row = dict(impl=f"stablelm-{mode}" + (f"-{args.quant}" if args.quant else ""), batch=batch,
                           context=context, ms_per_step=ms, tokens_per_s=batch * 1e3 / ms,
                           weights_gib=resident_bytes(model) / 2**30, kv_cache_gib=cache.nbytes() / 2**30)
                if cuda:
                    base = row["weights_gib"] + row["kv_cache_gib"]
                    row["peak_vram_gib"] = max(peaks.values()) / 2**30
                    row["vram_overhead"] = row["peak_vram_gib"] / base - 1
                    row["decode_vram_overhead"] = peaks["decode"] / 2**30 / base - 1
                    row["bw_util"] = step_bytes(model, cfg, batch, context, elt) / (ms * 1e-3) / (copy_gbs * 1e9)
                rows.append(row)
                del cache
                print(markdown_table([row], list(row)).splitlines()[-1], flush=True)

    hf_rows = set() if args.hf_rows == "none" or args.quant else (
        {(b, c) for b in batches for c in contexts} if args.hf_rows == "all" or args.tiny else
        {tuple(int(v) for v in r.split("x")) for r in args.hf_rows.split(",")})
    if hf_rows:
        for attn in ("eager", "sdpa"):
            hf = build_hf(model, attn)
            for batch, context in sorted(hf_rows):
                if cuda:
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                ms = hf_decode(hf, batch, context, steps)
                ours = next((r for r in rows if r["batch"] == batch and r["context"] == context), None)
                row = dict(impl=f"transformers-{attn}", batch=batch, context=context, ms_per_step=ms,
                           tokens_per_s=batch * 1e3 / ms,
                           speedup_of_stablelm=(ms / ours["ms_per_step"]) if ours else None)
                if cuda:  # our model stays resident during these rows: count transformers' memory only
                    row["peak_vram_gib"] = (torch.cuda.max_memory_allocated() - resident_bytes(model)) / 2**30
                rows.append(row)
                print(markdown_table([row], list(row)).splitlines()[-1], flush=True)
            del hf
            if cuda:
                torch.cuda.empty_cache()

    columns = ["impl", "batch", "context", "ms_per_step", "tokens_per_s", "bw_util", "peak_vram_gib",
               "weights_gib", "kv_cache_gib", "vram_overhead", "decode_vram_overhead", "speedup_of_stablelm"]
    print()
    print(markdown_table(rows, columns))
    payload = {"benchmark": "decode", "env": env, "model": args.preset if not args.tiny else "tiny",
               "dtype": str(dtype), "quant": args.quant, "copy_bandwidth_gbs": copy_gbs, "steps": steps,
               "rows": rows}
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
