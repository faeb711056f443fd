"""Issue 11 items 3 + 5 in one GPU run, each change against what it replaced, same process:

    python -m bench.gemv_wired [--out gemv_wired.json] [--steps 64]

1. host cost per call (bench.launch.host_us: time to enqueue, and wall time once the GPU has caught up) of
   prefill attention (16, 512, 1024 tokens), decode attention and the batch-1 linear, before / after:
   "before" = the Autotuner on every call + autograd.Function (kernels.attention.CHEAP_LAUNCH = False), the
   two-kernel decode combine (kernels.decode.FUSED_COMBINE = False), and triton.cdiv / next_power_of_2 put back
   in the launchers (the ~3 us ConstexprFunction calls kernels._common.cdiv replaced);
2. decode attention device time per call (CUDA graph of 32 calls over 32 different caches, L2 flushed between
   replays) at the 3B shape, bs 1 and 8, short and long contexts: fused combine vs the two-kernel combine;
3. the 3B model end to end: eager prefill at 1 x 512 / 1 x 1024 (attention triton before / after vs sdpa), and
   the CUDA-graph decode step at bs 1 ctx 128 (and bs 8 ctx 512) with ops.linear torch (cuBLAS) / triton (the
   decode GEMV) x decode combine two-kernel / fused.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc

import torch
import triton

import kernels.attention as A
import kernels.decode as D
import kernels.gemv as G
from bench.common import copy_bandwidth_gbs, environment, graph_ms, markdown_table, time_cuda, write_json
from bench.gemv_decode import graph_decode_ms, step_bytes
from bench.launch import host_us
from stablelm import StableLM, ops, preset


@contextlib.contextmanager
def before(module_flags=()):
    """The launchers as they were: triton's ConstexprFunction cdiv / next_power_of_2, and the given flags."""
    saved = [(m, n, getattr(m, n)) for m in (A, D, G) for n in ("cdiv", "next_power_of_2")]
    saved += [(m, n, getattr(m, n)) for m, n, _ in module_flags]
    try:
        for m in (A, D, G):
            m.cdiv, m.next_power_of_2 = triton.cdiv, triton.next_power_of_2
        for m, n, v in module_flags:
            setattr(m, n, v)
        yield
    finally:
        for m, n, v in saved:
            setattr(m, n, v)


OLD_ATTN = ((A, "CHEAP_LAUNCH", False),)
OLD_DECODE = ((D, "FUSED_COMBINE", False),)


def host_rows(dt=torch.bfloat16):
    rows = []
    H, Dh = 32, 80
    for S in (16, 512, 1024):
        q, k, v = (torch.randn(1, S, H, Dh, device="cuda", dtype=dt).transpose(1, 2) for _ in range(3))
        for impl, ctx in (("sdpa", contextlib.nullcontext), ("triton before", lambda: before(OLD_ATTN)),
                          ("triton after", contextlib.nullcontext)):
            fn = ops.implementation("attention", impl.split()[0])
            with ctx(), torch.no_grad():
                h, wall = host_us(lambda: fn(q, k, v))
            rows.append(dict(op=f"attention 1x{S} tokens", impl=impl, host_us=h, wall_us=wall))
    T = 512
    qd = torch.randn(1, H, Dh, device="cuda", dtype=dt)
    kc, vc = (torch.randn(1, H, T, Dh, device="cuda", dtype=dt) for _ in range(2))
    kv_len = torch.full((1,), 129, dtype=torch.int32, device="cuda")
    for impl, ctx in (("triton before", lambda: before(OLD_DECODE)), ("triton after", contextlib.nullcontext)):
        with ctx():
            h, wall = host_us(lambda: D.decode_attention_triton(qd, kc, vc, kv_len))
        rows.append(dict(op="decode_attention T512 len129", impl=impl, host_us=h, wall_us=wall))
    x = torch.randn(1, 1, 2560, device="cuda", dtype=dt)
    w = torch.randn(7680, 2560, device="cuda", dtype=dt)
    with torch.no_grad():
        for impl, fn, ctx in (("F.linear (cuBLAS)", torch.nn.functional.linear, contextlib.nullcontext),
                              ("triton before", G.linear_triton, before),
                              ("triton after", G.linear_triton, contextlib.nullcontext)):
            with ctx():
                h, wall = host_us(lambda: fn(x, w))
            rows.append(dict(op="linear 1x2560 -> 7680", impl=impl, host_us=h, wall_us=wall))
    return rows


def decode_rows(dt=torch.bfloat16):
    rows = []
    Hq = Hkv = 32
    Dh = 80
    for B, T, lens in ((1, 512, (128, 256, 384, 500)), (1, 4096, (128, 1024, 4096)), (8, 512, (128, 500)),
                       (8, 4096, (4096,))):
        sets = 32 if B * T <= 4096 else 8
        caches = [tuple(torch.randn(B, Hkv, T, Dh, device="cuda", dtype=dt) for _ in range(2)) for _ in range(sets)]
        q = torch.randn(B, Hq, Dh, device="cuda", dtype=dt)
        for n in lens:
            kv_len = torch.full((B,), n, dtype=torch.int32, device="cuda")
            inputs = [(q, kc, vc, kv_len) for kc, vc in caches]
            row = dict(B=B, T=T, kv_len=n)
            for name, fused in (("two_kernel_us", False), ("fused_us", True)):
                splits = D.num_splits(B, Hkv, T, dt, q.device, fused)
                row[name] = 1e3 * graph_ms([functools.partial(D.decode_attention_triton, *a, fused_combine=fused)
                                            for a in inputs])
                row[name.replace("_us", "_splits")] = splits
            kv_bytes = 2 * B * Hkv * n * Dh * 2
            row["fused_GBps"] = kv_bytes / (row["fused_us"] * 1e-6) / 1e9
            row["speedup"] = row["two_kernel_us"] / row["fused_us"]
            rows.append(row)
            print(row, flush=True)
        del caches
    return rows


def model_rows(steps, copy_gbs):
    cfg = preset("stablelm-3b-4e1t")
    model = StableLM.random(cfg, device="cuda", dtype=torch.bfloat16)
    prefill, decode = [], []
    for S in (512, 1024):
        ids = torch.randint(0, cfg.vocab_size, (1, S), device="cuda")
        for impl, ctx in (("sdpa", contextlib.nullcontext), ("triton before", lambda: before(OLD_ATTN)),
                          ("triton after", contextlib.nullcontext)):
            with ctx(), ops.using(attention=impl.split()[0]), torch.no_grad():
                ms = time_cuda(lambda: model(ids), warmup=3, iters=7)
            prefill.append(dict(batch=1, seq=S, attention=impl, ms=ms, tokens_per_s=S * 1e3 / ms))
            print(prefill[-1], flush=True)
    for batch, context in ((1, 128), (8, 512)):
        for linear in ("torch", "triton"):
            for fused in (False, True):
                D.FUSED_COMBINE = fused
                try:
                    with ops.using(linear=linear):
                        ms = graph_decode_ms(model, batch, context, steps)
                finally:
                    D.FUSED_COMBINE = True
                decode.append(dict(batch=batch, context=context, linear=linear,
                                   decode_combine="fused" if fused else "two-kernel", ms_per_step=ms,
                                   tokens_per_s=batch * 1e3 / ms,
                                   bw_util=step_bytes(model, batch, context) / (ms * 1e-3) / (copy_gbs * 1e9)))
                print(decode[-1], flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return prefill, decode


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a GPU")
    copy_gbs = copy_bandwidth_gbs()
    host, dec, prefill, step, errors = [], [], [], [], []

    def section(fn, *a):
        # One section failing must not cost the others (one GPU call measures them all).
        try:
            return fn(*a)
        except Exception:  # noqa: BLE001 - printed and recorded
            import traceback
            traceback.print_exc()
            errors.append(f"{fn.__name__}: {traceback.format_exc().splitlines()[-1]}")
            return None
    host = section(host_rows) or []
    print(markdown_table(host, ["op", "impl", "host_us", "wall_us"]), flush=True)
    dec = section(decode_rows) or []
    if not args.skip_model:
        prefill, step = section(model_rows, args.steps, copy_gbs) or ([], [])
    print("\n## host cost per call (us)")
    print(markdown_table(host, ["op", "impl", "host_us", "wall_us"]))
    print("\n## decode attention per call, CUDA graph (us)")
    print(markdown_table(dec, ["B", "T", "kv_len", "two_kernel_splits", "two_kernel_us", "fused_splits", "fused_us",
                               "speedup", "fused_GBps"]))
    print("\n## 3B eager prefill")
    print(markdown_table(prefill, ["batch", "seq", "attention", "ms", "tokens_per_s"]))
    print("\n## 3B CUDA-graph decode step")
    print(markdown_table(step, ["batch", "context", "linear", "decode_combine", "ms_per_step", "tokens_per_s",
                                "bw_util"]))
    if args.out:
        write_json(args.out, dict(benchmark="gemv_wired", env=environment(), copy_bandwidth_gbs=copy_gbs,
                                  steps=args.steps, host=host, decode_attention=dec, prefill=prefill,
                                  decode_step=step, errors=errors))
    if errors:
        print("ERRORS:", *errors, sep="\n  ")


if __name__ == "__main__":
    main()
