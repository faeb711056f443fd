"""Report-model training across GPUs: samples/s at the world size it is launched with, and peak memory per GPU.

    python -m bench.ddp_train [--out bench/results/ddp_train_h200.json]            # world of one (NCCL)
    torchrun --nproc-per-node 4 -m bench.ddp_train --out bench/results/ddp_train_h200x4.json
    python -m bench.ddp_train --tiny                                               # CPU smoke run (gloo)

The model vision.train builds (vision/pipeline.build_model: Swin-B encoder, projector, StableLM-3B by default,
random weights, bf16 frozen weights, fp32 trained ones), wrapped and stepped by the code vision.train runs
(vision/distributed.py: wrap, step_loss; clip, AdamW). Rows:

  lora-ddp    LoRA on the LM (fused layout), DDP over the adapters + projector: samples/s is the headline
  full-fsdp   full fine-tuning of the LM (fp32 master weights and AdamW moments), FSDP2 per block + root
  full-ddp    the same replicated with DDP: what FSDP2 saves per GPU (at world 1 the two are alike)

--batch-size is per rank (the global batch is world x it); reports are max_length tokens long (no padding), two
224 px images per study. step_ms is the median over --steps timed steps of the slowest rank (after --warmup);
samples_per_s = global batch / step. peak_gib is the largest torch.cuda.max_memory_allocated over the ranks.
A row that fails (e.g. out of memory) records its error and the next one runs.

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
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.common import environment, markdown_table, write_json  # noqa: E402
from stablelm import parallel  # noqa: E402
from stablelm.lora import make_optimizer  # noqa: E402
from vision import distributed, pipeline  # noqa: E402
from vision.report_model import ReportConfig  # noqa: E402

ROWS = {"lora-ddp": ("lora", "ddp"), "full-fsdp": ("full", "fsdp"), "full-ddp": ("full", "ddp")}
COLUMNS = ["row", "world", "per_rank_batch", "global_batch", "step_ms", "samples_per_s", "peak_gib",
           "trained_params", "error"]
WORDS = ("the heart size is normal lungs are clear no pleural effusion or pneumothorax mild cardiomegaly small "
         "left basilar opacity stable mediastinal contours degenerative changes of the spine").split()


def reports(n: int, words: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)) for i in range(n)]


def slowest(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run_row(name: str, args, ranks: distributed.Ranks, tokenizer: Path) -> dict:
    lm_mode, mode = ROWS[name]
    device = ranks.device
    cuda = device.type == "cuda"
    report = ReportConfig(lm_mode=lm_mode, max_length=args.max_length, lora_dropout=0.0,
                          gradient_checkpointing=args.gradient_checkpointing)
    spec = {"lm": None, "lm_preset": args.preset, "encoder": None, "encoder_preset": args.encoder_preset,
            "tokenizer": str(tokenizer), "seed": 0, "report": report.to_dict(), "dataset": "iu_xray",
            "precision": "bf16" if cuda else "fp32"}
    row = {"row": name, "world": ranks.world, "per_rank_batch": args.batch_size,
           "global_batch": args.batch_size * ranks.world}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = pipeline.build_model(spec, device, spec["precision"])
    row["trained_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wrapped = distributed.wrap(model, ranks, mode)
    optimizer, _ = make_optimizer(model, 1e-5, 0.05, 1000)
    trained = [p for p in model.parameters() if p.requires_grad]
    size = 224
    gen = torch.Generator().manual_seed(ranks.rank)
    batch = {"images": torch.randn(args.batch_size, 2, 3, size, size, generator=gen),
             "image_mask": torch.ones(args.batch_size, 2, dtype=torch.bool),
             # Long enough to fill max_length: every study trains on max_length report tokens.
             "reports": reports(args.batch_size, args.max_length * 2)}
    model.train()
    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss, _ = distributed.step_loss(wrapped, model, batch, ranks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_ms = slowest(statistics.median(times) * 1e3, device)
    row.update(step_ms=step_ms, samples_per_s=row["global_batch"] / (step_ms / 1e3))
    if cuda:
        row["peak_gib"] = slowest(torch.cuda.max_memory_allocated(device) / 2 ** 30, device)
    del model, wrapped, optimizer, trained, loss
    gc.collect()
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {list(ROWS)}")
    ap.add_argument("--preset", default="stablelm-3b-4e1t", help="LM preset (random weights)")
    ap.add_argument("--encoder-preset", default="swin-base", choices=sorted(pipeline.ENCODER_PRESETS))
    ap.add_argument("--batch-size", type=int, default=8, help="studies per rank per step")
    ap.add_argument("--max-length", type=int, default=100, help="report tokens per study")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (gloo): a smoke run of this script")
    ap.add_argument("--out", help="JSON file for the rows (written by rank 0)")
    args = ap.parse_args(argv)
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        ap.error("the benchmark needs a GPU; use --tiny on the CPU")
    if args.tiny:
        args.preset, args.encoder_preset, args.batch_size, args.max_length = "tiny", "tiny", 2, 16
        args.steps, args.warmup = 2, 1
    parallel.init_distributed("cuda" if cuda else "cpu")  # torchrun's group, or a world of one in process
    ranks = distributed.setup("cuda" if cuda else "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        # Each rank trains the same small BPE itself (deterministic; no shared filesystem needed).
        vocab = 512 if args.tiny else 8192
        tokenizer = pipeline.build_tokenizer(reports(64, 40) + [ReportConfig().instruction], Path(tmp), vocab)
        results = []
        for name in rows:
            try:
                results.append(run_row(name, args, ranks, tokenizer))
            except torch.OutOfMemoryError as e:
                gc.collect()
                torch.cuda.empty_cache()
                results.append({"row": name, "world": ranks.world, "error": f"OutOfMemoryError: {str(e)[:200]}"})
            if ranks.main:
                print(results[-1], flush=True)

    payload = {"rows": results}
    if ranks.main:
        payload["environment"] = {
            **environment(), "world_size": ranks.world, "backend": dist.get_backend(), "preset": args.preset,
            "encoder_preset": args.encoder_preset,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "multicast": "off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1)"}
        print(markdown_table(results, COLUMNS))
        if args.out:
            write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
