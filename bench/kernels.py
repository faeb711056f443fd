"""Kernel benchmark: our Triton kernels against PyTorch at StableLM-3B shapes (CUDA only, ~4 minutes on an H100).

    python -m bench.kernels [--quick] [--out bench/results/kernels_h200.json]

Sections (each printed as a markdown table and stored in the JSON with the GPU, versions and date):
  prefill   causal attention forward and backward TFLOP/s, 32 heads, head_dim 80 (plus 64/128 at one size): triton
            against SDPA with the FLASH_ATTENTION and the CUDNN_ATTENTION backends. FLOPs: forward
            2 * 2 * B * H * S * S * D / 2, backward 2.5 x forward. Inputs are [B, S, H, D] tensors seen as
            [B, H, S, D] (the model's layout) for every implementation.
  decode    one query per sequence against a full KV cache, 32 heads, head_dim 80: GB/s with bytes = K and V
            actually read + q + out, triton against SDPA over the filled cache slots.
  elementwise  rotary, layer_norm (with and without the fused residual), swiglu at 16384 tokens.
Bandwidth is also given as a fraction of the measured copy bandwidth (a 1 GiB device-to-device copy, bytes read +
written). Times are triton.testing.do_bench medians; do_bench clears L2 before every call, and inputs that would
fit in L2 are additionally rotated over several copies. Our implementations are the ones stablelm.ops
dispatches to (ops.implementation).
"""
from __future__ import annotations

import argparse
import functools
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import bench_ms, copies_for, copy_bandwidth_gbs, environment, graph_ms, markdown_table, write_json
from stablelm import ops

HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE, ROTARY_DIM = 32, 80, 2560, 6912, 20  # StableLM-3B
DTYPE = torch.bfloat16
DEVICE = "cuda"
TARGETS = dict(prefill_fwd_vs_flash=1.3, decode_frac_copy=0.8, rotary_frac_copy=0.8)
# The reference points (measured on an H100), printed for context.
REFERENCE = "reference H100 measurements: SDPA flash causal fwd head_dim 80 = 324 TFLOP/s, copy = 3.0 TB/s"


def guarded(fn):
    """Run fn(); on failure return the error's first line so one broken row does not end the run."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - reported in the row
        return None, f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


# ----------------------------------------------------------------------------------------------------------------
# Prefill attention
# ----------------------------------------------------------------------------------------------------------------

def prefill_impls():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return fn
    return {"flash": sdpa(SDPBackend.FLASH_ATTENTION), "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
            "triton": ops.implementation("attention", "triton")}


def prefill_inputs(B, S, D, grad):
    def one():
        return torch.randn(B, S, HEADS, D, device=DEVICE, dtype=DTYPE).transpose(1, 2).requires_grad_(grad)
    return one(), one(), one()


def prefill_row(B, S, D, impls):
    fwd_flops = 2 * 2 * B * HEADS * S * S * D / 2
    bwd_flops = 2.5 * fwd_flops
    row = dict(batch=B, seq=S, head_dim=D)
    qkv_bytes = 3 * B * S * HEADS * D * 2
    for name, fn in impls.items():
        def fwd():
            sets = [prefill_inputs(B, S, D, grad=False) for _ in range(copies_for(4 * qkv_bytes // 3))]
            with torch.no_grad():
                return bench_ms(fn, sets)

        def bwd():
            sets = []
            for _ in range(copies_for(3 * qkv_bytes)):
                q, k, v = prefill_inputs(B, S, D, grad=True)
                out = fn(q, k, v)
                sets.append((out, (q, k, v), torch.randn_like(out)))
            return bench_ms(lambda out, inp, dout: torch.autograd.grad(out, inp, dout, retain_graph=True), sets)

        for kind, measure, flops in (("fwd", fwd, fwd_flops), ("bwd", bwd, bwd_flops)):
            ms, err = guarded(measure)
            row[f"{kind}_{name}"] = flops / ms / 1e9 if ms else err
        torch.cuda.empty_cache()
    for kind in ("fwd", "bwd"):
        tri, ref = row.get(f"{kind}_triton"), row.get(f"{kind}_flash")
        row[f"{kind}_triton/flash"] = tri / ref if isinstance(tri, float) and isinstance(ref, float) else None
    return row


def prefill_shapes(quick):
    """(batch, seq, head_dim): head_dim 80 over seq x batch with batch * seq <= 32768, then 64 and 128 at one size."""
    seqs = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192]
    batches = [1, 4] if quick else [1, 2, 4, 8, 16]
    shapes = [(B, S, HEAD_DIM) for S in seqs for B in batches if B * S <= 32768]
    return shapes + [(4, 2048, 64), (4, 2048, 128)]


def bench_prefill(shapes):
    impls = prefill_impls()
    cols = ["batch", "seq", "head_dim"] + [f"{k}_{n}" for k in ("fwd", "bwd") for n in (*impls, "triton/flash")]
    print(f"\n## Prefill attention (causal, {HEADS} heads, bf16): TFLOP/s\n")
    print(markdown_table([], cols), flush=True)
    rows = []
    for B, S, D in shapes:
        rows.append(prefill_row(B, S, D, impls))
        print(markdown_table(rows[-1:], cols).splitlines()[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Decode attention
# ----------------------------------------------------------------------------------------------------------------

def decode_sets(B, ctx, nbytes):
    sets = []
    for _ in range(copies_for(nbytes)):
        cache = torch.randn(2, B, HEADS, ctx, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        q = torch.randn(B, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        kv_len = torch.full((B,), ctx, dtype=torch.int32, device=DEVICE)
        sets.append((q, cache[0], cache[1], kv_len))
    return sets


def sdpa_decode(q, k_cache, v_cache, kv_len):
    """SDPA over the filled cache slots; the caches here are exactly full, so that slice is the whole cache."""
    return F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache)[:, :, 0]


def bench_decode(batches, contexts, copy_gbs):
    impls = {"triton": ops.implementation("decode_attention", "triton"), "sdpa": sdpa_decode}
    rows = []
    cols = ["impl", "batch", "context", "us", "GB/s", "frac_copy"]
    print(f"\n## Decode attention ({HEADS} heads, head_dim {HEAD_DIM}, bf16): bytes = K/V read + q + out\n")
    print(markdown_table([], cols), flush=True)
    for B in batches:
        for ctx in contexts:
            nbytes = 2 * B * HEADS * ctx * HEAD_DIM * 2 + 2 * B * HEADS * HEAD_DIM * 2
            for name, fn in impls.items():
                row = dict(impl=name, batch=B, context=ctx)
                ms, err = guarded(lambda: graph_ms([functools.partial(fn, *s) for s in decode_sets(B, ctx, nbytes)]))
                if ms:
                    gbs = nbytes / ms / 1e6
                    row.update({"us": ms * 1e3, "GB/s": gbs, "frac_copy": gbs / copy_gbs})
                else:
                    row["us"] = err
                rows.append(row)
                print(markdown_table([row], cols).splitlines()[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Rotary, LayerNorm, SwiGLU
# ----------------------------------------------------------------------------------------------------------------

def rotary_bytes(tokens, heads, in_place):
    """(sector_bytes, useful_bytes) of one rotary call on q and k rows of HEAD_DIM bf16 values.

    In place, only the first ROTARY_DIM values of each head row are read and written; DRAM moves whole 32-byte
    sectors, so a 40-byte rotary slice at the start of a 160-byte (sector-aligned) head row costs 64 bytes each way:
    sector bytes are the least traffic any kernel can cause, useful bytes the values themselves. Out of place, the
    whole q and k must be read and written. cos and sin (float32, ROTARY_DIM / 2 each per token) are read once.
    """
    elt = 2
    cos_sin = 2 * tokens * (ROTARY_DIM // 2) * 4
    if not in_place:
        full = 2 * tokens * heads * HEAD_DIM * elt
        return full + cos_sin, full + cos_sin
    useful = 2 * tokens * heads * ROTARY_DIM * elt
    sectors = math.ceil(ROTARY_DIM * elt / 32) * 32
    return 2 * tokens * heads * sectors + cos_sin, useful + cos_sin


def bench_elementwise(B, S, copy_gbs):
    tokens = B * S
    rows = []
    cols = ["op", "impl", "shape", "us", "GB/s", "frac_copy", "bytes counted"]
    print(f"\n## Elementwise kernels at {tokens} tokens (bf16)\n")
    print(markdown_table([], cols), flush=True)

    def record(op, impl, shape, fn, make_sets, count_bytes, how):
        row = dict(op=op, impl=impl, shape=shape)

        def measure():
            sets = make_sets()
            nbytes = count_bytes(fn, sets[0])
            ms = graph_ms([functools.partial(fn, *s) for s in sets])
            return ms, nbytes
        res, err = guarded(measure)
        if res:
            ms, nbytes = res
            gbs = nbytes / ms / 1e6
            row.update({"us": ms * 1e3, "GB/s": gbs, "frac_copy": gbs / copy_gbs, "bytes counted": how(fn)})
        else:
            row["us"] = err
        rows.append(row)
        print(markdown_table([row], cols).splitlines()[-1], flush=True)

    # Rotary on q and k viewed out of the fused QKV projection output [B, S, 3 * heads, D], as the model calls it.
    def rotary_sets():
        one = 3 * tokens * HEADS * HEAD_DIM * 2
        sets = []
        for _ in range(copies_for(one)):
            qkv = torch.randn(B, S, 3 * HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
            angle = torch.rand(B, S, ROTARY_DIM // 2, device=DEVICE) * 6.3
            sets.append((qkv[:, :, :HEADS], qkv[:, :, HEADS:2 * HEADS], angle.cos(), angle.sin()))
        return sets

    def rotary_in_place(fn, example):
        q = example[0]
        return fn(*example)[0].data_ptr() == q.data_ptr()

    in_place = {}

    def rotary_count(fn, example):
        in_place[fn] = rotary_in_place(fn, example)
        return rotary_bytes(tokens, 2 * HEADS, in_place[fn])[0]

    def rotary_how(fn):
        if in_place[fn]:
            return "in place: 32-byte sectors of the rotary dims of q, k read + written, cos/sin read"
        return "out of place: q, k read + written in full, cos/sin read"

    for impl in ("triton", "torch"):
        record("rotary", impl, f"q,k [{B},{S},{HEADS},{HEAD_DIM}] rotary_dim {ROTARY_DIM}",
               ops.implementation("rotary", impl), rotary_sets, rotary_count, rotary_how)

    def norm_sets(residual):
        def make():
            one = (3 if residual else 2) * tokens * HIDDEN * 2
            sets = []
            for _ in range(copies_for(one)):
                x = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=DTYPE)
                w = 1 + 0.1 * torch.randn(HIDDEN, device=DEVICE, dtype=DTYPE)
                b = 0.1 * torch.randn(HIDDEN, device=DEVICE, dtype=DTYPE)
                r = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=DTYPE) if residual else None
                sets.append((x, w, b, 1e-5, r))
            return sets
        return make

    for residual in (False, True):
        streams = 4 if residual else 2
        for impl in ("triton", "torch"):
            record("layer_norm" + ("+residual" if residual else ""), impl, f"x [{tokens},{HIDDEN}]",
                   ops.implementation("layer_norm", impl), norm_sets(residual),
                   lambda fn, ex, s=streams: s * tokens * HIDDEN * 2 + 2 * HIDDEN * 2,
                   lambda fn, residual=residual: ("x, residual read; y, sum written" if residual else
                                                  "x read, y written") + "; weight, bias read")

    def swiglu_sets():
        one = 3 * tokens * INTERMEDIATE * 2
        sets = []
        for _ in range(copies_for(one)):
            gate_up = torch.randn(tokens, 2 * INTERMEDIATE, device=DEVICE, dtype=DTYPE)
            sets.append(tuple(gate_up.split(INTERMEDIATE, dim=-1)))
        return sets

    for impl in ("triton", "torch"):
        record("swiglu", impl, f"gate, up [{tokens},{INTERMEDIATE}] (views of one gate_up tensor)",
               ops.implementation("swiglu", impl), swiglu_sets, lambda fn, ex: 3 * tokens * INTERMEDIATE * 2,
               lambda fn: "gate, up read; out written")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Targets and entry point
# ----------------------------------------------------------------------------------------------------------------

def target_row(name, values, threshold, unit):
    values = [v for v in values if isinstance(v, float)]
    if not values:
        return dict(target=name, result="not measured")
    ok = sum(v >= threshold for v in values)
    values.sort()
    return dict(target=name, rows=len(values), min=values[0], median=values[len(values) // 2], max=values[-1],
                unit=unit, result="met" if ok == len(values) else f"not met ({ok}/{len(values)} rows meet it)")


def targets(prefill, decode, elementwise):
    return [
        target_row(f"prefill fwd >= {TARGETS['prefill_fwd_vs_flash']}x SDPA flash, head_dim 80",
                   [r["fwd_triton/flash"] for r in prefill if r["head_dim"] == HEAD_DIM],
                   TARGETS["prefill_fwd_vs_flash"], "x SDPA flash"),
        target_row(f"decode >= {TARGETS['decode_frac_copy']:.0%} of copy bandwidth, context >= 2048",
                   [r.get("frac_copy") for r in decode if r["impl"] == "triton" and r["context"] >= 2048],
                   TARGETS["decode_frac_copy"], "of copy"),
        target_row(f"rotary >= {TARGETS['rotary_frac_copy']:.0%} of copy bandwidth",
                   [r.get("frac_copy") for r in elementwise if r["op"] == "rotary" and r["impl"] == "triton"],
                   TARGETS["rotary_frac_copy"], "of copy"),
    ]


def default_out(gpu_name):
    model = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]*)\b", gpu_name or "")
    return Path("bench/results") / f"kernels_{(model.group(1) if model else 'gpu').lower()}.json"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes (about a minute)")
    ap.add_argument("--sections", default="prefill,decode,elementwise", help="comma-separated subset to run")
    ap.add_argument("--out", help="JSON path (default bench/results/kernels_<gpu>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("bench.kernels measures CUDA kernels and needs a GPU")
    torch.manual_seed(0)
    env = environment()
    print(f"# Kernel benchmark on {env['gpu']} (torch {env['torch']}, triton {env.get('triton')}, {env['date']})")
    print(REFERENCE)
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth (1 GiB device-to-device, read + write): {copy_gbs:.0f} GB/s")

    sections = set(args.sections.split(","))
    prefill = bench_prefill(prefill_shapes(args.quick)) if "prefill" in sections else []
    decode = bench_decode([1, 8], [512, 2048, 8192] if args.quick else [128, 256, 512, 1024, 2048, 4096, 8192],
                          copy_gbs) if "decode" in sections else []
    elementwise = bench_elementwise(4 if args.quick else 8, 2048, copy_gbs) if "elementwise" in sections else []
    goals = targets(prefill, decode, elementwise)
    print("\n## Targets\n")
    print(markdown_table(goals, ["target", "rows", "min", "median", "max", "unit", "result"]))

    payload = dict(env=env, quick=args.quick, copy_gbs=copy_gbs, prefill=prefill, decode=decode,
                   elementwise=elementwise, targets=goals)
    out = Path(args.out) if args.out else default_out(env["gpu"])
    write_json(out, payload)
    print(f"\nwrote {out}")
    return payload


if __name__ == "__main__":
    main()
