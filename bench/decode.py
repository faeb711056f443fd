"""Decode benchmark: the whole public generate() call of this project against its peers, same run, same weights.

    python -m bench.decode [--rows 1x128,8x512,32x512] [--new-tokens 256]
                           [--quant int8|int4 [--quantize-head] [--quantize-embedding]]
                           [--peers stablelm-no-pdl,stablelm-eager,stablelm-torch-compile,transformers-sdpa,
                                    transformers-static-compile]
                           [--out bench/results/decode_h200.json]
    python -m bench.decode --tiny        # small random model on the CPU (a smoke run of the same code)

StableLM-3B shape, random bf16 weights, greedy, `--new-tokens` new tokens per call (no stop ids), prompts of
`context` random tokens. Every row times the public call a user makes (median of `--iters` calls after warm-up
calls that record / compile):

  stablelm                     stablelm.generate (default ops, CUDA-graph decode session)
  stablelm-no-pdl              the same with ops.use(pdl=False): the kernels launched without programmatic
                               dependent launch (what PDL, on by default, buys: kernels/_common.py)
  stablelm-eager               the same with cuda_graph=False (what the graphs buy)
  stablelm-torch-compile       the gpt-fast recipe applied to this model: reference ("torch") ops with SDPA
                               attention (prefill and decode, masked over the static cache, as gpt-fast), the decode
                               step compiled by torch.compile (inductor) over the same static cache and replayed
                               from one CUDA graph, through the same DecodeSession (CompileBuilder; inductor's
                               own "reduce-overhead" graphs skip this step on torch 2.11, see stablelm/graph.py)
  transformers-sdpa            StableLmForCausalLM.generate(), sdpa attention, its default (dynamic) cache
  transformers-static-compile  the same with cache_implementation="static" and compile_config=CompileConfig()
                               (transformers' documented static-cache + torch.compile path; on the CPU it does
                               not compile, so --tiny reports it as transformers-static)

Columns: call_ms (one generate() call, prompt included), tokens_per_s (batch x new tokens / call), step_ms and
overhead_ms. For this project's rows step_ms is the recorded decode step alone (replayed with CUDA events at the
middle context, `DecodeSession.replay`) and prefill_ms the prompt pass alone, so overhead_ms = call_ms - prefill_ms
- (new_tokens - 1) x step_ms is what a generate() call costs beyond its prefill and steps. That difference is a
few ms of a call of hundreds, so a step replayed alone that runs slightly faster or slower than the call's own
steps (clocks, the contexts the call walks through) moves it: marginal_step_ms (the ms per token between calls of
new_tokens and new_tokens / 2, as transformers' rows measure theirs) and overhead_marginal_ms (the same
difference with it) give a second estimate that does not lean on the replay. For transformers' rows step_ms is
that marginal ms per token (no overhead column).
bw_util = bytes a step must read (every weight once + the KV cache up to the middle context) / step_ms / copy
bandwidth measured in this run; call_bw_util the same over the decode part of the whole call; read_bw_util the
step's bytes over the read bandwidth measured in this run (a sum over 1 GiB: the copy's read + write ran at 0.73x
of it on some H200 leases, so a fraction of the copy figure can pass 1). The ratio table
gives call_ms(peer) / call_ms(stablelm) per row.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

import stablelm.ops as ops
from bench.common import (bench_device, copy_bandwidth_gbs, environment, markdown_table, read_bandwidth_gbs,
                          resident_bytes, time_cuda, weight_bytes, write_json)
from stablelm import StableLM, preset
from stablelm.generate import DecodeSession, generate
from stablelm.graph import CompileBuilder

# The gpt-fast recipe's ops: plain PyTorch, attention through SDPA with a mask over the static cache (the "torch"
# decode reference upcasts the whole cache to float32 every step, which inductor cannot fuse away: at 8 x 512 that
# peer took 28.9 ms a step, a straw man, not the recipe).
RECIPE_OPS = {op: "torch" for op in ops.CUDA_PREFERENCE} | {"attention": "sdpa", "decode_attention": "sdpa"}
PEERS = ["stablelm-no-pdl", "stablelm-eager", "stablelm-torch-compile", "transformers-sdpa",
         "transformers-static-compile"]


def step_bytes(model, cfg, batch, context, elt) -> int:
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elt
    return weight_bytes(model) + batch * kv_per_token * (context + 1)


def build_hf(model, attn):
    from transformers import StableLmConfig, StableLmForCausalLM

    from stablelm.checkpoint import project_to_hf
    config = StableLmConfig(**model.config.to_hf())
    config._attn_implementation = attn
    with torch.device(model.device):
        hf = StableLmForCausalLM(config).to(model.dtype).eval()
    hf.load_state_dict(project_to_hf(model.state_dict(), model.config))
    return hf


def wall_ms(fn, iters: int) -> float:
    """Median wall-clock ms of fn() (the device synchronised before and after each call)."""
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def ours_row(model, session, ids, new, iters, warmup, use_ops=None, timing_iters=3, **kw):
    """(call_ms, step_ms, prefill_ms, marginal_step_ms) of generate() through `session`, under the ops choice
    `use_ops`; marginal_step_ms as transformers' rows get theirs, from calls of new and new / 2 tokens."""
    batch, context = ids.shape
    mask = torch.ones_like(ids)
    half = max(1, new // 2)
    with ops.using(**(use_ops or {})):
        def call(n=new):
            return generate(model, ids, attention_mask=mask, session=session, max_new_tokens=n, stop_ids=[], **kw)
        for _ in range(warmup):
            out = call()
            call(half)  # its cache length may be another bucket: recorded here, not timed
        assert out.shape == (batch, new), out.shape
        call_ms = wall_ms(call, iters)
        steps = min(32, new)
        at = context + max(1, (new - steps) // 2)  # the middle of the call's contexts
        # replay() runs the last call's step and cache: before the shorter calls, whose bucket may be smaller
        step_ms = time_cuda(lambda: session.replay(steps, at), warmup=1, iters=timing_iters) / steps
        marginal_step_ms = (call_ms - wall_ms(lambda: call(half), iters)) / (new - half) if new > half else None
        cache = model.make_cache(batch, context)

        def prefill():
            cache.reset()
            with torch.no_grad():
                model.prefill(cache, ids)
        prefill_ms = time_cuda(prefill, warmup=1, iters=timing_iters)
    return call_ms, step_ms, prefill_ms, marginal_step_ms


def hf_row(hf, ids, new, iters, warmup, **kw):
    """(call_ms, marginal step_ms) of transformers' generate()."""
    mask = torch.ones_like(ids)

    def call(n):
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0, **kw)
    for _ in range(warmup):
        out = call(new)
    assert out.shape == (ids.shape[0], ids.shape[1] + new), out.shape
    call_ms = wall_ms(lambda: call(new), iters)
    half = max(1, new // 2)
    for _ in range(warmup if "compile_config" in kw else 0):
        call(half)  # a new length may recompile
    half_ms = wall_ms(lambda: call(half), iters)
    return call_ms, (call_ms - half_ms) / (new - half)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke run)")
    ap.add_argument("--preset", default="stablelm-3b-4e1t")
    ap.add_argument("--rows", help="batch x context rows (default 1x128,8x512,32x512; tiny: 2x16)")
    ap.add_argument("--new-tokens", type=int, help="default 256 (tiny: 8)")
    ap.add_argument("--iters", type=int, default=3, help="timed calls per row (median)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list from {PEERS}, or 'none'")
    ap.add_argument("--eager-batches", default="1", help="batch sizes where stablelm-eager runs")
    ap.add_argument("--quant", choices=["int8", "int4"])
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size (tiny: 32)")
    ap.add_argument("--quantize-head", action="store_true", help="with --quant: the lm_head too (convert's option)")
    ap.add_argument("--quantize-embedding", action="store_true",
                    help="with --quant: the embedding table too (convert's option)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    if (args.quantize_head or args.quantize_embedding) and not args.quant:
        ap.error("--quantize-head and --quantize-embedding need --quant int8|int4")
    cuda, device, dtype = bench_device(ap, args.tiny)
    peers = [] if args.peers == "none" else args.peers.split(",")
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        ap.error(f"unknown peers {unknown}; choose from {PEERS}")
    if args.tiny:
        cfg, iters, warmup, timing_iters = preset("tiny"), 1, 1, 1
        rows = args.rows or "2x16"
        new = 8 if args.new_tokens is None else args.new_tokens
        # CPU smoke run: dynamo traces the step but runs it eagerly (inductor's C++ build would take minutes).
        compiler = CompileBuilder(backend="eager", mode=None, warmup=1, capture=False)
    else:
        cfg, iters, warmup = preset(args.preset), args.iters, 2
        timing_iters = max(3, iters)
        rows = args.rows or "1x128,8x512,32x512"
        new = 256 if args.new_tokens is None else args.new_tokens
        compiler = CompileBuilder()  # inductor kernels captured in one CUDA graph
    if new < 1:
        ap.error(f"--new-tokens must be >= 1, got {new}")
    rows_spec = [tuple(int(v) for v in r.split("x")) for r in rows.split(",")]
    eager_batches = {int(b) for b in args.eager_batches.split(",")} if not args.tiny else {2}
    if args.quant:
        peers = [p for p in peers if not p.startswith("transformers")]  # transformers runs the float model only
    env = environment()
    copy_gbs = copy_bandwidth_gbs() if cuda else None
    read_gbs = read_bandwidth_gbs() if cuda else None
    model = StableLM.random(cfg, device=device, dtype=dtype)
    suffix = ""
    if args.quant:
        from stablelm.quantize import DEFAULT_SKIP, HEAD_QUANTIZED_SKIP, quantize_model
        group = 32 if args.tiny else args.group_size  # the tiny MLP width (352) is not a multiple of 128
        quantize_model(model, {"int8": 8, "int4": 4}[args.quant], group,
                       skip=HEAD_QUANTIZED_SKIP if args.quantize_head else DEFAULT_SKIP, embed=args.quantize_embedding)
        suffix = f"-{args.quant}" + ("-head" if args.quantize_head else "") + ("-embed" if args.quantize_embedding
                                                                                else "")
    elt = torch.finfo(dtype).bits // 8
    rows = []

    def fresh():
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    header = {"benchmark": "decode", "env": env, "model": args.preset if not args.tiny else "tiny",
              "dtype": str(dtype), "quant": args.quant, "quantize_head": args.quantize_head,
              "quantize_embedding": args.quantize_embedding, "copy_bandwidth_gbs": copy_gbs,
              "read_bandwidth_gbs": read_gbs, "new_tokens": new,
              "iters": iters}

    def add(row):
        """Keep a finished row; with --out the file is rewritten after each one ("complete": false until the
        end), so a run cut short by a time limit keeps what it measured."""
        rows.append(row)
        print(row if "error" in row else markdown_table([row], list(row)).splitlines()[-1], flush=True)
        if args.out:
            write_json(args.out, {**header, "complete": False, "rows": rows})

    def record(row):
        if cuda:
            row["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
        add(row)

    def run_ours(impl, batch, context, session, use_ops=None, **kw):
        fresh()
        ids = torch.randint(0, cfg.vocab_size, (batch, context), device=device)
        row = dict(impl=impl + suffix, batch=batch, context=context, new_tokens=new)
        try:
            call_ms, step_ms, prefill_ms, marginal = ours_row(model, session, ids, new, iters, warmup, use_ops,
                                                              timing_iters, **kw)
        except Exception as e:  # a failing peer is reported, not fatal to the other rows
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            add(row)
            return
        mid = context + new // 2
        row.update(call_ms=call_ms, tokens_per_s=batch * new * 1e3 / call_ms, step_ms=step_ms,
                   step_source="replay", prefill_ms=prefill_ms,
                   overhead_ms=call_ms - prefill_ms - (new - 1) * step_ms)
        if marginal is not None:
            row.update(marginal_step_ms=marginal, overhead_marginal_ms=call_ms - prefill_ms - (new - 1) * marginal)
        if copy_gbs:
            nbytes = step_bytes(model, cfg, batch, mid, elt)
            row["bw_util"] = nbytes / (step_ms * 1e-3) / (copy_gbs * 1e9)
            row["call_bw_util"] = nbytes * (new - 1) / ((call_ms - prefill_ms) * 1e-3) / (copy_gbs * 1e9)
            row["read_bw_util"] = nbytes / (step_ms * 1e-3) / (read_gbs * 1e9)
        record(row)
        session.clear()

    for batch, context in rows_spec:
        run_ours("stablelm", batch, context, DecodeSession(model))
        if "stablelm-no-pdl" in peers:
            run_ours("stablelm-no-pdl", batch, context, DecodeSession(model), use_ops={"pdl": False})
        if "stablelm-eager" in peers and batch in eager_batches:
            run_ours("stablelm-eager", batch, context, DecodeSession(model), cuda_graph=False)
        if "stablelm-torch-compile" in peers:
            run_ours("stablelm-torch-compile", batch, context, DecodeSession(model, builder=compiler),
                     use_ops=RECIPE_OPS)

    hf_peers = [p for p in peers if p.startswith("transformers")]
    if hf_peers:
        from transformers import CompileConfig
        hf = build_hf(model, "sdpa")
        for batch, context in rows_spec:
            for peer in hf_peers:
                fresh()
                kw = {}
                impl = peer
                if peer == "transformers-static-compile":
                    kw = dict(cache_implementation="static", compile_config=CompileConfig())
                    impl = peer if cuda else "transformers-static"
                ids = torch.randint(0, cfg.vocab_size, (batch, context), device=device)
                row = dict(impl=impl, batch=batch, context=context, new_tokens=new)
                try:
                    call_ms, step_ms = hf_row(hf, ids, new, iters, warmup, **kw)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    add(row)
                    continue
                row.update(call_ms=call_ms, tokens_per_s=batch * new * 1e3 / call_ms, step_ms=step_ms,
                           step_source="marginal")
                if cuda:  # our model stays resident during these rows: count transformers' memory only
                    row["peak_vram_gib"] = (torch.cuda.max_memory_allocated() - resident_bytes(model)) / 2**30
                add(row)
        del hf
        fresh()

    # Ratios: every peer's whole-call time over this project's, row by row.
    ratios = []
    for batch, context in rows_spec:
        ours = next((r for r in rows if r["impl"] == "stablelm" + suffix and r["batch"] == batch
                     and r["context"] == context and "call_ms" in r), None)
        if ours is None:
            continue
        ratio = dict(batch=batch, context=context, stablelm_tokens_per_s=ours["tokens_per_s"])
        for r in rows:
            if r["batch"] == batch and r["context"] == context and r is not ours and "call_ms" in r:
                ratio[f"vs {r['impl']}"] = r["call_ms"] / ours["call_ms"]
                r["speedup_of_stablelm"] = r["call_ms"] / ours["call_ms"]
        ratios.append(ratio)

    columns = ["impl", "batch", "context", "new_tokens", "call_ms", "tokens_per_s", "step_ms", "step_source",
               "prefill_ms", "overhead_ms", "overhead_marginal_ms", "bw_util", "call_bw_util", "read_bw_util",
               "peak_vram_gib", "speedup_of_stablelm", "error"]
    print()
    print(markdown_table(rows, columns))
    ratio_columns = sorted({k for r in ratios for k in r}, key=lambda k: (not k.startswith("batch"),
                                                                           k != "context", k))
    print()
    print("speedup of stablelm's generate() (peer call time / ours):")
    print(markdown_table(ratios, ratio_columns))
    payload = {**header, "complete": True, "rows": rows, "ratios": ratios}
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
