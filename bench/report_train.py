"""Training-step benchmark of the report model: ours against transformers + peft, same shapes, same weights.

    python -m bench.report_train [--batch-size 8] [--steps 50] [--rows a,b] [--out bench/results/report_train_h200.json]
    python -m bench.report_train --tiny        # tiny LM + tiny Swin on the CPU in fp32 (smoke run, seconds)
    python -m bench.report_train --rows stablelm-lora-peft,stablelm-lora-peft-compile,transformers-lora

Ours: vision.pipeline's ReportModel with the StableLM-3B shape (random weights, bf16) and a random Swin-base encoder
(bf16), frozen encoder, projector trained in float32, the default `stablelm.ops` (Triton on CUDA). Transformers: the
same ReportModel prompt wrap, labels and loss around transformers' StableLmForCausalLM (sdpa, our LM weights
projected with project_to_hf) and SwinModel, LoRA via peft (stablelm.lora.apply_lora on the same layers where peft is
missing). The Swin weights are identical too: transformers' random SwinModel init is converted into our encoder
(vision.swin_checkpoint.convert_hf_state_dict), and our projector is copied into theirs, so the step-0 losses (eval
mode, no dropout) agree to bf16 rounding.

Rows (--rows, comma separated; default all), each with its peer (speedup = peer step time / the row's):
  stablelm-lora-peft       LoRA r 16 / alpha 16 / dropout 0.1 on q/k/v/o/gate/up/down (peft's layout and
                           count), computed through the fused qkv / gate_up (stablelm/lora.py separate=True);
                           peer transformers-lora
  stablelm-lora-peft-compile  the same with the LM part of the loss under torch.compile (ReportModel.compile_loss:
                           reference ops + SDPA traced into one graph; --compile-mode, default reduce-overhead, i.e.
                           inductor's kernels replayed from CUDA graphs; --tiny: the aot_eager_decomp_partition
                           backend, AOT autograd's graphs and partitioner without code generation, so the smoke run
                           stays quick); peer transformers-lora, and reported against stablelm-lora-peft
                           (speedup_vs_eager)
  stablelm-lora-peft-compile-default  the same compiled in inductor's default mode whatever --compile-mode says: no
                           CUDA graphs, so no graph pool holding the step's memory between steps (the host
                           launches inductor's kernels, ahead of the GPU as nothing in the step waits for it)
  stablelm-lora-peft-compile-budget  stablelm-lora-peft-compile saving at most half of the activations its
                           partitioner would (ReportModel.compile_loss memory_budget=0.5, `--compile-memory-budget`;
                           the rest recomputed in the backward); peer transformers-lora
  stablelm-lora-fused      one adapter per fused qkv / o / gate_up / down (4 per layer); peer transformers-lora
  stablelm-lora-peft-ckpt  the peft layout with gradient checkpointing; peer transformers-lora-ckpt
  stablelm-lora-peft-ckpt-compile  the same compiled as stablelm-lora-peft-compile (the recomputed forward inside
                           the one graph); peer transformers-lora-ckpt, and reported against stablelm-lora-peft-ckpt
  stablelm-full            full fine-tuning of the LM (AdamW, float32 master weights, as ReportModel keeps every
                           trained tensor); peer transformers-full
  stablelm-full-mixed      full fine-tuning in bf16 with float32 master weights and moments in the optimizer
                           (precision bf16-mixed: stablelm.optim.MasterAdamW); peer transformers-full-autocast
  stablelm-full-mixed-compile  the same with the loss compiled as stablelm-lora-peft-compile; peer
                           transformers-full-autocast, and reported against stablelm-full-mixed
  stablelm-qlora-int8/int4/nf4  the peft layout over a frozen int8 / int4 (group 128) / nf4 (block 64) LM; peer
                           transformers-lora, and reported against stablelm-lora-peft (step-time ratio, loss
                           after the steps)
  transformers-lora, transformers-lora-ckpt, transformers-full   the peers (peft on the seven projections)
  transformers-full-autocast  transformers' mixed precision for full fine-tuning (the Trainer's bf16=True): float32
                           weights and AdamW, the step's forward under torch.autocast(bf16)

One step = forward (loss) + backward + AdamW step + zero_grad on B studies of 2 random 224x224 images and
synthetic reports of ~60 words (max_length 100 report tokens); the same batch every step. Each row runs in its own
phase (the previous model freed first). Per row: step times of --steps steps after 3 warm-up steps (CUDA events
around each step; CPU: perf_counter): median, p10, p90; compile_s: the wall seconds of the step-0 loss and the
warm-up steps, where a compiled row compiles and records its graphs (excluded from the step times); tokens/s
counting every position of the padded sequence; GPU-busy time: the summed durations of the device kernels (and
copies) of 5 further steps under torch.profiler, per step, over the median step time (a launch-bound step shows a
low fraction); peak VRAM since the phase began, less what an earlier row left allocated (leftover_gib, ~0: compile
caches are reset between rows), against the budget the issue names: resident weights (quantized
where they are) + trained-tensor state (float32 weight, gradient and two AdamW moments, or under bf16-mixed bf16
weight and gradient, float32 master and moments: 16 bytes per trained parameter either way) + activations (memory
held by the graph after a forward, measured); trainable parameters; the loss at step 0 (eval mode) and after the
timed steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import bench_device, environment, markdown_table, resident_bytes, write_json
from bench.decode import build_hf
from stablelm import StableLM, preset
from stablelm.lora import apply_lora, make_optimizer
from stablelm.optim import MasterAdamW
from stablelm.quantize import quantize_model
from stablelm.tokenizer import Tokenizer
from vision.pipeline import ENCODER_PRESETS, build_tokenizer, set_trained_dtype
from vision.report_model import COMPILE_MODES, ReportConfig, ReportModel, check_compile
from vision.swin import SwinEncoder
from vision.swin_checkpoint import convert_hf_state_dict
from vision.synthetic import sample_findings, write_report

IMAGES_PER_STUDY = 2
REPORT_WORDS = 60
WARMUP = 3
TOKENIZER_VOCAB = 1024  # a BPE on the synthetic reports saturates well below this
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROFILED_STEPS = 5
COLUMNS = ["impl", "batch", "step_ms", "p10_ms", "p90_ms", "compile_s", "gpu_busy", "kernels_per_step",
           "tokens_per_s", "peak_vram_gib", "peak_vs_budget", "trainable_params", "speedup", "loss_step0", "loss_last"]
# name -> (side, settings). quant: (bits, group on the GPU, group for --tiny (its 352 intermediate), format).
ROWS = {
    "stablelm-lora-peft": ("ours", dict(lm_mode="lora", lora_layout="peft")),
    "stablelm-lora-peft-compile": ("ours", dict(lm_mode="lora", lora_layout="peft", compile=True)),
    "stablelm-lora-peft-compile-default": ("ours", dict(lm_mode="lora", lora_layout="peft", compile="default")),
    "stablelm-lora-peft-compile-budget": ("ours", dict(lm_mode="lora", lora_layout="peft", compile=True,
                                                       memory_budget=0.5)),
    "stablelm-lora-fused": ("ours", dict(lm_mode="lora", lora_layout="fused")),
    "stablelm-lora-peft-ckpt": ("ours", dict(lm_mode="lora", lora_layout="peft", gradient_checkpointing=True)),
    "stablelm-lora-peft-ckpt-compile": ("ours", dict(lm_mode="lora", lora_layout="peft", gradient_checkpointing=True,
                                                     compile=True)),
    "stablelm-full": ("ours", dict(lm_mode="full")),
    "stablelm-full-mixed": ("ours", dict(lm_mode="full", precision="bf16-mixed")),
    "stablelm-full-mixed-compile": ("ours", dict(lm_mode="full", precision="bf16-mixed", compile=True)),
    "stablelm-qlora-int8": ("ours", dict(lm_mode="lora", lora_layout="peft", quant=(8, 128, 128, "int"))),
    "stablelm-qlora-int4": ("ours", dict(lm_mode="lora", lora_layout="peft", quant=(4, 128, 32, "int"))),
    "stablelm-qlora-nf4": ("ours", dict(lm_mode="lora", lora_layout="peft", quant=(4, 64, 32, "nf4"))),
    "transformers-lora": ("hf", dict(lm_mode="lora")),
    "transformers-lora-ckpt": ("hf", dict(lm_mode="lora", gradient_checkpointing=True)),
    "transformers-full": ("hf", dict(lm_mode="full")),
    "transformers-full-autocast": ("hf", dict(lm_mode="full", autocast=True)),
}
PEERS = {"stablelm-lora-peft": "transformers-lora", "stablelm-lora-peft-compile": "transformers-lora",
         "stablelm-lora-peft-compile-default": "transformers-lora",
         "stablelm-lora-peft-compile-budget": "transformers-lora",
         "stablelm-lora-fused": "transformers-lora",
         "stablelm-lora-peft-ckpt": "transformers-lora-ckpt",
         "stablelm-lora-peft-ckpt-compile": "transformers-lora-ckpt",
         "stablelm-full": "transformers-full",
         "stablelm-full-mixed": "transformers-full-autocast",
         "stablelm-full-mixed-compile": "transformers-full-autocast",
         "stablelm-qlora-int8": "transformers-lora", "stablelm-qlora-int4": "transformers-lora",
         "stablelm-qlora-nf4": "transformers-lora"}


# ---------------------------------------------------------------------------- inputs
def synthetic_reports(n: int, seed: int) -> list[str]:
    """n reports of REPORT_WORDS words, each joined from several synthetic chest-X-ray reports."""
    rng = np.random.default_rng(seed)
    reports = []
    for _ in range(n):
        words = []
        while len(words) < REPORT_WORDS:
            words += write_report(sample_findings(rng), rng).split()
        reports.append(" ".join(words[:REPORT_WORDS]))
    return reports


def random_images(batch: int, size: int, device, dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, IMAGES_PER_STUDY, 3, size, size, generator=gen, device=device).to(dtype)


# ---------------------------------------------------------------------------- the transformers side
class HFSwinEncoder(nn.Module):
    """transformers' SwinModel behind our encoder's interface: pixels -> (tokens, pooled)."""

    def __init__(self, swin):
        super().__init__()
        self.swin = swin
        self.num_features = swin.config.hidden_size

    def forward(self, pixel_values):
        out = self.swin(pixel_values=pixel_values)
        return out.last_hidden_state, out.pooler_output


class HFLanguageModel(nn.Module):
    """transformers' StableLmForCausalLM (or its peft wrapper, set later as `.hf`) behind the interface
    ReportModel uses: `.embed`, `.config.hidden_size`, and input embeddings -> logits."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.config = hf.config

    @property
    def embed(self):
        return self.hf.get_input_embeddings()

    def forward(self, input_embeds, attention_mask=None):
        return self.hf(inputs_embeds=input_embeds, attention_mask=attention_mask, use_cache=False).logits

    def loss(self, input_embeds, attention_mask=None, labels=None):
        """transformers' own causal-LM loss (full logits, float32 cross-entropy, labels shifted inside)."""
        return self.hf(inputs_embeds=input_embeds, attention_mask=attention_mask, labels=labels,
                       use_cache=False).loss


def random_hf_swin_state(encoder_config, seed: int) -> dict:
    """A randomly initialised transformers SwinModel's float32 state dict (on the CPU)."""
    from transformers import SwinConfig, SwinModel
    torch.manual_seed(seed)
    # Our SwinConfig fields carry transformers' names (and defaults), so they pass straight through.
    return SwinModel(SwinConfig(**encoder_config.to_dict())).state_dict()


def lm_base_weights(lm: StableLM) -> dict:
    """Our LM's frozen weights under the plain (adapter-free) names: LoRALinear keeps the wrapped layer as
    `.base`, next to its `lora_A` / `lora_B`."""
    return {k.replace(".base.", "."): v for k, v in lm.state_dict().items()
            if not k.rpartition(".")[2].startswith("lora_")}


def build_ours(lm_config, encoder_config, tokenizer, report: ReportConfig, settings: dict, seed: int, swin_state,
               tiny: bool, device, dtype, compile_with: tuple[str, str] | None = None) -> ReportModel:
    """Our ReportModel for one row: the random LM of `seed` (the same weights every row), quantized in place for the
    QLoRA rows before the adapters go on, and the converted transformers Swin. compile_with: (mode, backend) of
    ReportModel.compile_loss for the rows that compile (a row naming its own mode takes that one instead)."""
    lm = StableLM.random(lm_config, seed=seed, device=device, dtype=dtype)
    quant = settings.get("quant")
    if quant:
        bits, group, tiny_group, fmt = quant
        quantize_model(lm, bits, tiny_group if tiny else group, fmt=fmt)
    encoder = SwinEncoder(encoder_config).to(device)
    encoder.load_state_dict(convert_hf_state_dict(swin_state, encoder_config))
    encoder.to(dtype)
    config = dataclasses.replace(report, **{k: v for k, v in settings.items()
                                             if k not in ("quant", "compile", "memory_budget", "precision")})
    torch.manual_seed(seed)  # the projector's (and adapters') initialisation: the same in every row
    model = ReportModel(encoder, lm, tokenizer, config).to(device)
    set_trained_dtype(model, settings.get("precision", "bf16"))  # as vision.pipeline.build_model
    if settings.get("compile"):
        model.compile_loss(*row_compile(settings, *compile_with), settings.get("memory_budget"))
    return model


def build_transformers(lm_weights: dict, lm_config, swin_state: dict, encoder_config, projector: dict, tokenizer,
                       report: ReportConfig, lora_backend: str, device, dtype,
                       settings=None) -> tuple[ReportModel, str]:
    """ReportModel around transformers' StableLM and Swin holding the given weights, LoRA on the seven
    projections of every layer (settings lm_mode "full": every LM weight trains instead, float32 as ours;
    gradient_checkpointing: transformers' own, non-reentrant). Returns (model, LoRA backend label)."""
    settings = settings or {"lm_mode": "lora"}
    from transformers import SwinConfig, SwinModel
    with torch.device("meta"):
        plain = StableLM(lm_config)
    plain.load_state_dict({k: v.to(device) for k, v in lm_weights.items()}, assign=True)
    hf_lm = build_hf(plain, "sdpa")
    del plain
    with torch.device(device):
        swin = SwinModel(SwinConfig(**encoder_config.to_dict())).to(dtype)
    swin.load_state_dict(swin_state)
    # lm_mode "frozen": ReportModel freezes both models and trains the projector; LoRA goes on below.
    frozen = dataclasses.replace(report, lm_mode="frozen", encoder_mode="frozen")
    model = ReportModel(HFSwinEncoder(swin), HFLanguageModel(hf_lm), tokenizer, frozen).to(device)
    model.proj.load_state_dict(projector["proj"])
    model.proj_norm.load_state_dict(projector["proj_norm"])
    if settings.get("gradient_checkpointing"):
        hf_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings["lm_mode"] == "full":
        for p in hf_lm.parameters():
            p.requires_grad_(True)
            p.data = p.data.float()
        return model, "full"
    if lora_backend == "auto":  # peft is installed on the GPU machine, not necessarily elsewhere
        lora_backend = "peft" if importlib.util.find_spec("peft") else "stablelm.lora"
    if lora_backend == "peft":
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=report.lora_r, lora_alpha=report.lora_alpha, lora_dropout=report.lora_dropout,
                            target_modules=HF_LORA_TARGETS, bias="none")
        model.lm.hf = get_peft_model(hf_lm, config)  # float32 adapters on the bf16 base (peft's default)
    else:
        apply_lora(hf_lm, dict.fromkeys(HF_LORA_TARGETS), report.lora_r, report.lora_alpha, report.lora_dropout)
    return model, lora_backend


def row_compile(settings: dict, mode: str, backend: str) -> tuple[str, str]:
    """(mode, backend) a compiled row runs: its own inductor mode where it names one, else the run's."""
    own = settings["compile"]
    return (own if isinstance(own, str) and backend == "inductor" else mode), backend


def adapter_shapes(model: ReportModel) -> str:
    """The LoRA matrices of the LM's first layer, e.g. 'qkv.lora_A 16x2560', to show how adapters differ."""
    shapes = []
    for name, p in model.lm.named_parameters():
        if p.requires_grad and (name.startswith("layers.0.") or ".layers.0." in name):
            short = name.split("layers.0.", 1)[1].removesuffix(".weight").replace(".default", "")
            for module in ("self_attn.", "attn.", "mlp."):
                short = short.replace(module, "")
            shapes.append(f"{short} {'x'.join(map(str, p.shape))}")
    return ", ".join(shapes)


# ---------------------------------------------------------------------------- measuring
def train_step(forward, optimizer, images, reports, last: dict) -> None:
    loss = forward(images, reports)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    last["loss"] = loss.detach()


def sequence_length(model: ReportModel, images, reports) -> int:
    with torch.no_grad():
        return model.training_inputs(images[:1], reports[:1])[0].shape[1]


def _sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def step_times(step, steps: int, cuda: bool) -> list[float]:
    """Milliseconds of each of `steps` calls (CUDA events around each, read after the last; CPU: perf_counter)."""
    if not cuda:
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def gpu_busy_ms(step, steps: int, cuda: bool):
    """(summed device-side kernel / copy durations per step in ms, device events per step) of `steps` steps under
    torch.profiler; (None, None) on the CPU or when the profiler reports no device events."""
    if not cuda:
        return None, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not device_events:
        return None, None
    busy_us = sum(e.time_range.elapsed_us() for e in device_events)
    return busy_us / steps / 1e3, len(device_events) / steps


def activation_bytes(model, forward, images, reports, cuda: bool):
    """Memory the autograd graph holds after one forward (freed again by the backward). None for a compiled
    loss: its CUDA graphs keep their activations in a pool allocated once, so the difference reads ~0."""
    if not cuda or getattr(model, "_compiled_lm_loss", None) is not None:
        return None
    _sync(cuda)
    before = torch.cuda.memory_allocated()
    loss = forward(images, reports)
    _sync(cuda)
    held = torch.cuda.memory_allocated() - before
    loss.backward()
    model.zero_grad(set_to_none=True)
    return held


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def measure(impl: str, model: ReportModel, images, reports, steps: int, cuda: bool, leftover: int = 0,
            autocast: bool = False) -> dict:
    """One row; the peak VRAM counts from here (its weights are already resident). leftover: bytes still allocated
    before this row's model was built (an earlier row's tensors), left out of its peak. autocast: every forward
    under torch.autocast(bf16) (the transformers mixed-precision peer)."""
    seq = sequence_length(model, images, reports)

    def forward(*args):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(*args)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model.eval()  # no dropout / stochastic depth: the two implementations must give the same loss here
    with torch.no_grad():
        loss0 = forward(images, reports).item()
    model.train()
    optimizer, _ = make_optimizer(model, lr=1e-4, weight_decay=0.05, total_steps=WARMUP + steps + PROFILED_STEPS)
    not_fp32 = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if not_fp32 and not isinstance(optimizer, MasterAdamW):
        raise RuntimeError(f"{impl}: trained tensors without float32 master weights: {not_fp32[:5]}")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trained_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    last = {}

    def step():
        train_step(forward, optimizer, images, reports, last)

    for _ in range(WARMUP if cuda else 1):  # --tiny: one warm-up step keeps the smoke run short
        step()
    _sync(cuda)
    compile_s = time.perf_counter() - t0
    times = step_times(step, steps, cuda)
    loss_last = last["loss"].item()
    busy_ms, kernels = gpu_busy_ms(step, PROFILED_STEPS, cuda)
    acts = activation_bytes(model, forward, images, reports, cuda)
    ms = percentile(times, 50)
    weights = resident_bytes(model) - trained_bytes  # the trained tensors are counted in their state below
    budget = None if acts is None else weights + 16 * trained + acts
    peak = torch.cuda.max_memory_allocated() - leftover if cuda else None
    batch = images.shape[0]
    row = dict(impl=impl, batch=batch, seq_len=seq, steps=steps, step_ms=ms, p10_ms=percentile(times, 10),
               p90_ms=percentile(times, 90), compile_s=compile_s, gpu_busy_ms=busy_ms,
               gpu_busy=None if busy_ms is None else busy_ms / ms, kernels_per_step=kernels,
               tokens_per_s=batch * seq * 1e3 / ms, peak_vram_gib=None if peak is None else peak / 2**30,
               weights_gib=weights / 2**30, trained_state_gib=16 * trained / 2**30,
               activations_gib=None if acts is None else acts / 2**30,
               peak_vs_budget=None if budget is None else peak / budget,
               trainable_params=trained, loss_step0=loss0, loss_last=loss_last, adapters_layer0=adapter_shapes(model),
               leftover_gib=leftover / 2**30)
    print(markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    return row


def free(cuda: bool) -> None:
    # A compiled row's graphs (and, under reduce-overhead, their CUDA-graph memory pool) live in torch's compile
    # caches, not in the model: without the reset they stay allocated and count in every later row's peak.
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny LM + tiny Swin on the CPU in fp32 (smoke run)")
    ap.add_argument("--batch-size", type=int, help="studies per step (default 8; --tiny: 2)")
    ap.add_argument("--steps", type=int, help="timed steps after 3 warm-up steps (default 50; --tiny: 2)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows to run, of {', '.join(ROWS)}")
    ap.add_argument("--compile-mode", choices=COMPILE_MODES,
                    help="torch.compile mode of the -compile row (default: reduce-overhead with inductor, else "
                         "default)")
    ap.add_argument("--compile-backend", help="torch.compile backend of the -compile rows (default: inductor; --tiny: "
                                              "aot_eager_decomp_partition, which compiles in seconds on the CPU)")
    ap.add_argument("--hf-lora", choices=["auto", "peft", "stablelm.lora"], default="auto",
                    help="LoRA on the transformers side (auto: peft when installed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    names = [n for n in args.rows.split(",") if n]
    unknown = sorted(set(names) - set(ROWS))
    if unknown or not names:
        ap.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")

    cuda, device, dtype = bench_device(ap, args.tiny)
    compile_backend = args.compile_backend or ("aot_eager_decomp_partition" if args.tiny else "inductor")
    compile_mode = args.compile_mode or ("reduce-overhead" if compile_backend == "inductor" else "default")
    try:
        check_compile(compile_mode, compile_backend)
        for name in names:  # before any row runs: a row's own budget must suit the backend
            settings = ROWS[name][1]
            if settings.get("compile"):
                check_compile(*row_compile(settings, compile_mode, compile_backend), settings.get("memory_budget"))
    except ValueError as e:
        ap.error(f"--compile-mode / --compile-backend: {e}")
    lm_preset, encoder_preset = ("tiny", "tiny") if args.tiny else ("stablelm-3b-4e1t", "swin-base")
    batch = args.batch_size or (2 if args.tiny else 8)
    steps = args.steps or (2 if args.tiny else 50)
    lm_config, encoder_config = preset(lm_preset), ENCODER_PRESETS[encoder_preset]()
    report = ReportConfig(lm_mode="lora", encoder_mode="frozen", lora_r=16, lora_alpha=16.0, lora_dropout=0.1,
                          max_length=100)
    env = environment()

    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthetic_reports(256, args.seed + 1) + [report.instruction]
        tokenizer_dir = str(build_tokenizer(corpus, Path(tmp), min(TOKENIZER_VOCAB, lm_config.vocab_size)))
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
    swin_state = random_hf_swin_state(encoder_config, args.seed)
    images = random_images(batch, encoder_config.image_size, device, dtype, args.seed)
    reports = synthetic_reports(batch, args.seed)
    report_tokens = [min(len(tokenizer.encode(r, add_special_tokens=False)) + 1, report.max_length)
                     for r in reports]

    # Ours first (any order of --rows); the transformers rows get the same float LM (same seed, same device
    # generator) and the projector as initialised.
    rows, lm_weights, projector = [], None, None
    for name in sorted(names, key=lambda n: ROWS[n][0] != "ours"):
        side, settings = ROWS[name]
        backend = "stablelm.lora"
        leftover = torch.cuda.memory_allocated() if cuda else 0
        if side == "ours":
            model = build_ours(lm_config, encoder_config, tokenizer, report, settings, args.seed, swin_state,
                               args.tiny, device, dtype, (compile_mode, compile_backend))
        else:
            if lm_weights is None:
                plain = StableLM.random(lm_config, seed=args.seed, device=device, dtype=dtype)
                lm_weights = {k: v.cpu() for k, v in plain.state_dict().items()}
                fresh = build_ours(lm_config, encoder_config, tokenizer, report, {"lm_mode": "frozen"}, args.seed,
                                   swin_state, args.tiny, device, dtype)
                projector = {"proj": {k: v.detach().clone() for k, v in fresh.proj.state_dict().items()},
                             "proj_norm": {k: v.detach().clone() for k, v in fresh.proj_norm.state_dict().items()}}
                del plain, fresh
                free(cuda)
            model, backend = build_transformers(lm_weights, lm_config, swin_state, encoder_config, projector,
                                                tokenizer, report, args.hf_lora, device, dtype, settings)
        row = measure(name, model, images, reports, steps, cuda, leftover, settings.get("autocast", False))
        row["lora_backend"] = backend
        if settings.get("compile"):
            mode, backend = row_compile(settings, compile_mode, compile_backend)
            row.update(compile_mode=mode, compile_backend=backend, compile_memory_budget=settings.get("memory_budget"))
        rows.append(row)
        if args.out:  # rewritten after each row ("complete": false until the end): a run cut short keeps its rows
            write_json(args.out, {"benchmark": "report_train", "env": env, "complete": False, "rows": rows})
        del model
        free(cuda)

    by_name = {r["impl"]: r for r in rows}
    for row in rows:
        peer = by_name.get(PEERS.get(row["impl"], row["impl"]))
        row["peer"] = peer["impl"] if peer else None
        row["speedup"] = peer["step_ms"] / row["step_ms"] if peer else None
        base = by_name.get("stablelm-lora-peft")
        eager = by_name.get(row["impl"].partition("-compile")[0])  # a compiled row's eager twin
        if "-compile" in row["impl"] and eager:
            row["speedup_vs_eager"] = eager["step_ms"] / row["step_ms"]
        if row["impl"].startswith("stablelm-qlora") and base:
            row["step_vs_bf16_lora"] = row["step_ms"] / base["step_ms"]
            row["loss_last_rel_vs_bf16_lora"] = abs(row["loss_last"] - base["loss_last"]) / abs(base["loss_last"])
    ours_row, hf_row = by_name.get("stablelm-lora-peft"), by_name.get("transformers-lora")
    loss_rel_diff = None
    notes = [f"sequence: {rows[0]['seq_len']} positions (prompt + visual tokens + {report.max_length} report slots); "
             f"real report tokens per study (with the end token): mean {sum(report_tokens) / len(report_tokens):.1f}",
             "gpu_busy: summed device kernel/copy time per step (torch.profiler, "
             f"{PROFILED_STEPS} steps) / median step time; peak_vs_budget: peak VRAM / (resident weights + 16 B "
             "per trained parameter + activations held after a forward)"]
    if ours_row and hf_row:
        loss_rel_diff = abs(ours_row["loss_step0"] - hf_row["loss_step0"]) / abs(hf_row["loss_step0"])
        notes.insert(0, f"step-0 loss (eval mode, identical weights and inputs): stablelm-lora-peft "
                        f"{ours_row['loss_step0']:.5f}, transformers-lora ({hf_row['lora_backend']}) "
                        f"{hf_row['loss_step0']:.5f} (relative difference {loss_rel_diff:.2e})")
        notes.append(f"LoRA adapters of layer 0: stablelm-lora-peft: {ours_row['adapters_layer0']}; "
                     f"transformers-lora: {hf_row['adapters_layer0']}")
    print()
    print(markdown_table(rows, COLUMNS))
    print()
    for note in notes:
        print("-", note)
    if loss_rel_diff is not None and (not math.isfinite(loss_rel_diff) or loss_rel_diff > 0.05):
        print(f"WARNING: step-0 losses differ by {loss_rel_diff:.1%}; the two sides are not computing the same thing")
    payload = {"benchmark": "report_train", "env": env, "complete": True, "lm": lm_preset, "encoder": encoder_preset,
               "dtype": str(dtype), "batch": batch, "images_per_study": IMAGES_PER_STUDY, "steps": steps,
               "warmup": WARMUP, "profiled_steps": PROFILED_STEPS, "report_config": report.to_dict(),
               "report_tokens": report_tokens, "loss_step0_rel_diff": loss_rel_diff, "notes": notes, "rows": rows}
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
