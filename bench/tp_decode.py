"""Decode step under tensor parallelism: ms per step of the tensor-parallel model (TP = the world size, NCCL) against
the plain one-GPU model, with the CUDA-graph decode session both ways.

    python -m bench.tp_decode [--rows 1x512,8x512] [--new-tokens 64] [--out bench/results/tp_decode_h200.json]
    torchrun --nproc-per-node 4 -m bench.tp_decode            # TP=4 (any world size; the plain model per GPU)
    python -m bench.tp_decode --tiny                          # CPU smoke run: tiny model, gloo, world of one

StableLM-3B shape, random bf16 weights (the same seeded weights on every rank; each rank keeps its shard of them),
greedy, no stop ids. Rows per (batch, context):

  plain     generate() of the unsharded model on this rank's GPU (no collectives)
  tp        generate() of the model from stablelm.parallel.load_sharded at TP = world size: 2 all-reduces per
            layer + 1 all-gather of the logits per step, all inside the captured decode step

step_ms is the recorded decode step alone (DecodeSession.replay, CUDA events, the slowest rank's median),
overhead_ms = tp - plain, tokens_match whether TP generated the plain model's tokens (at TP=1 required: the same
kernels run on the same numbers; at TP>1 bf16 partial sums are added in another order, so a near-tie may flip).
allreduce_us is one all-reduce of a [batch, hidden] bf16 activation, replayed from a CUDA graph of 64 of them (what
the step pays per call).

Run with NVLink multicast off (set here before torch.distributed starts: NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
"""
from __future__ import annotations

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value  # before any process group exists

import argparse  # noqa: E402
import gc  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.common import environment, markdown_table, time_cuda, write_json  # noqa: E402
from stablelm import StableLM, parallel, preset  # noqa: E402
from stablelm.generate import DecodeSession  # noqa: E402

COLUMNS = ["world", "batch", "context", "plain_step_ms", "tp_step_ms", "overhead_ms", "overhead_pct",
           "allreduce_us", "tokens_match"]


def step_ms(model, ids, new: int, iters: int) -> tuple[float, torch.Tensor]:
    """(median ms of one recorded decode step at the middle context, the greedy tokens of the warm-up call)."""
    session = DecodeSession(model)
    out = session.generate(ids, max_new_tokens=new, stop_ids=[])
    steps = min(32, new)
    at = ids.shape[1] + max(1, (new - steps) // 2)
    with torch.no_grad():
        ms = time_cuda(lambda: session.replay(steps, at), warmup=1, iters=iters) / steps
    return ms, out


def slowest(ms: float, device) -> float:
    t = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def allreduce_us(batch: int, hidden: int, dtype, device, calls: int = 64) -> float | None:
    """µs per all-reduce of [batch, 1, hidden], replayed from one CUDA graph (None on the CPU)."""
    if device.type != "cuda":
        return None
    x = torch.ones(batch, 1, hidden, dtype=dtype, device=device)
    for _ in range(3):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            dist.all_reduce(x)
    return time_cuda(graph.replay, warmup=3, iters=10) / calls * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1x512,8x512", help="BATCHxCONTEXT,...")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--preset", default="stablelm-3b-4e1t")
    ap.add_argument("--no-plain", action="store_true", help="skip the unsharded model (it must fit one GPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (gloo): a smoke run of this script")
    ap.add_argument("--out", help="JSON file for the rows (written by rank 0)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        ap.error("the benchmark needs a GPU; use --tiny on the CPU")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = preset("tiny" if args.tiny else args.preset)
    device = parallel.init_distributed("cuda" if cuda else "cpu")
    world, rank = dist.get_world_size(), dist.get_rank()

    full = StableLM.random(cfg, seed=0, device=device, dtype=dtype)  # identical on every rank
    tp_model = parallel.load_sharded(cfg, None, full.state_dict(), tp=world, device=device, dtype=dtype)
    plain = None if args.no_plain else full
    del full
    gc.collect()

    rows = []
    for spec in args.rows.split(","):
        batch, context = (int(v) for v in spec.lower().split("x"))
        ids = torch.randint(3, cfg.vocab_size, (batch, context), generator=torch.Generator().manual_seed(batch))
        ids = ids.to(device)
        tp_ms, tp_out = step_ms(tp_model, ids, args.new_tokens, args.iters)
        row = {"world": world, "batch": batch, "context": context, "tp_step_ms": slowest(tp_ms, device),
               "allreduce_us": allreduce_us(batch, cfg.hidden_size, dtype, device)}
        if plain is not None:
            plain_ms, plain_out = step_ms(plain, ids, args.new_tokens, args.iters)
            row["plain_step_ms"] = slowest(plain_ms, device)
            row["overhead_ms"] = row["tp_step_ms"] - row["plain_step_ms"]
            row["overhead_pct"] = 100 * row["overhead_ms"] / row["plain_step_ms"]
            row["tokens_match"] = bool(torch.equal(tp_out, plain_out))
        rows.append(row)
        if rank == 0:
            print(row, flush=True)

    if rank == 0:
        env = {**environment(), "world_size": world, "backend": dist.get_backend(),
               "preset": "tiny" if args.tiny else args.preset, "new_tokens": args.new_tokens,
               "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
               "multicast": "off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1)"}
        print(markdown_table(rows, COLUMNS))
        if args.out:
            write_json(args.out, {"environment": env, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
