"""What programmatic dependent launch buys a recorded decode step, and how far ahead the GEMV should prefetch.

    python -m bench.pdl_sweep [--rows 1x128,8x512] [--formats bf16,int8] [--prefetch 0,1,2,16]
                              [--out bench/results/pdl_sweep_h200.json]

StableLM-3B shape, random weights. For each format (bf16, or weight-only int8 / int4 g128 through quantize_model),
batch x context row and setting, one generate() call records the step through a DecodeSession, then
`DecodeSession.replay` times 32 steps at the middle context with CUDA events (median of 5): the step alone, as
bench.decode's step_ms. Settings: PDL off (ops.use(pdl=False): the kernels as they were before PDL), then PDL on
with kernels.gemv.PREFETCH_TILES set to each --prefetch value (K tiles per GEMV program prefetched into L2 before
the wait; 0: none). Columns: step_ms, tokens/s of the step alone, and the speedup over PDL off.
"""
from __future__ import annotations

import argparse

import torch

import kernels.gemv
import stablelm.ops as ops
from bench.common import environment, markdown_table, write_json
from stablelm import StableLM, preset
from stablelm.generate import DecodeSession
from stablelm.measure import time_cuda
from stablelm.quantize import quantize_model

STEPS = 32


def step_ms(model, batch, context, new=64) -> float:
    session = DecodeSession(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    session.generate(ids, max_new_tokens=new, stop_ids=[])
    at = context + new // 2
    ms = time_cuda(lambda: session.replay(STEPS, at), warmup=1, iters=5) / STEPS
    session.clear()
    return ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1x128", help="batch x context rows")
    ap.add_argument("--formats", default="bf16,int8", help="comma list from bf16, int8, int4")
    ap.add_argument("--prefetch", default="0,1,2,16", help="kernels.gemv.PREFETCH_TILES values with PDL on")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a GPU")
    formats = args.formats.split(",")
    if set(formats) - {"bf16", "int8", "int4"}:
        ap.error(f"--formats takes bf16, int8, int4; got {args.formats}")
    rows_spec = [tuple(int(v) for v in r.split("x")) for r in args.rows.split(",")]
    prefetch = [int(v) for v in args.prefetch.split(",")]
    header = {"benchmark": "pdl_sweep", "env": environment(), "model": "stablelm-3b-4e1t", "steps": STEPS}
    rows = []
    default_prefetch = kernels.gemv.PREFETCH_TILES
    for fmt in formats:
        model = StableLM.random(preset("stablelm-3b-4e1t"), device="cuda", dtype=torch.bfloat16)
        if fmt != "bf16":
            quantize_model(model, {"int8": 8, "int4": 4}[fmt], 128)
        for batch, context in rows_spec:
            with ops.using(pdl=False):
                base = step_ms(model, batch, context)
            settings = [("off", None, base)]
            for tiles in prefetch:
                kernels.gemv.PREFETCH_TILES = tiles
                try:
                    with ops.using(pdl=True):
                        settings.append(("on", tiles, step_ms(model, batch, context)))
                finally:
                    kernels.gemv.PREFETCH_TILES = default_prefetch
            for pdl, tiles, ms in settings:
                row = dict(format=fmt, batch=batch, context=context, pdl=pdl, prefetch_tiles=tiles, step_ms=ms,
                           step_tokens_per_s=batch * 1e3 / ms, speedup_vs_off=base / ms)
                rows.append(row)
                print(markdown_table([row], list(row)).splitlines()[-1], flush=True)
            if args.out:
                write_json(args.out, {**header, "complete": False, "rows": rows})
        del model
        torch.cuda.empty_cache()
    print()
    print(markdown_table(rows, list(rows[0])))
    payload = {**header, "complete": True, "rows": rows}
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
