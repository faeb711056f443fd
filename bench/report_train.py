"""Training-step benchmark of the report model: ours against transformers + peft, same shapes, same weights.

    python -m bench.report_train [--batch-size 8] [--steps 10] [--out bench/results/report_train_h200.json]
    python -m bench.report_train --tiny        # tiny LM + tiny Swin on the CPU in fp32 (smoke run)

Ours: vision.pipeline.build_model with the StableLM-3B shape (random weights, bf16) and a random Swin-base encoder
(bf16), LoRA on the LM (r 16, alpha 16, dropout 0.1), frozen encoder, projector trained in float32, the default
`stablelm.ops` (Triton on CUDA). Transformers: the same ReportModel prompt wrap, labels and loss around
transformers' StableLmForCausalLM (sdpa, our LM weights projected with project_to_hf) and SwinModel, LoRA via
peft (vision.lora.apply_lora on the same layers where peft is missing). The Swin weights are identical too:
transformers' random SwinModel init is converted into our encoder (vision.swin_checkpoint.convert_hf_state_dict),
and our projector is copied into theirs, so the step-0 losses (eval mode, no dropout) should agree to bf16 rounding.

One step = forward (loss) + backward + AdamW step + zero_grad on B studies of 2 random 224x224 images and
synthetic reports of ~60 words (max_length 100 report tokens). Each implementation runs in its own phase (the
other's model freed first): median step time over --steps after 3 warm-up steps, tokens/s counting every
position of the padded sequence (prompt + visual + report), peak VRAM since the phase began (weights, adapters,
optimizer state, activations), trainable parameters. speedup = transformers step time / the row's step time.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import bench_device, environment, markdown_table, time_cuda, write_json
from bench.decode import build_hf
from stablelm import StableLM, preset
from stablelm.lora import make_optimizer
from stablelm.tokenizer import Tokenizer
from vision.lora import apply_lora
from vision.pipeline import ENCODER_PRESETS, build_model, build_tokenizer
from vision.report_model import ReportConfig, ReportModel
from vision.swin_checkpoint import convert_hf_state_dict
from vision.synthetic import sample_findings, write_report

IMAGES_PER_STUDY = 2
REPORT_WORDS = 60
WARMUP = 3
TOKENIZER_VOCAB = 1024  # a BPE on the synthetic reports saturates well below this
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COLUMNS = ["impl", "batch", "step_ms", "tokens_per_s", "peak_vram_gib", "trainable_params", "speedup",
           "loss_step0"]


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


def build_transformers(lm_weights: dict, lm_config, swin_state: dict, encoder_config, projector: dict, tokenizer,
                       report: ReportConfig, lora_backend: str, device, dtype) -> tuple[ReportModel, str]:
    """ReportModel around transformers' StableLM and Swin holding the given weights, LoRA on the seven
    projections of every layer. Returns (model, implementation label)."""
    from transformers import SwinConfig, SwinModel
    with torch.device("meta"):
        plain = StableLM(lm_config)
    plain.load_state_dict(lm_weights, assign=True)
    hf_lm = build_hf(plain, "sdpa")
    with torch.device(device):
        swin = SwinModel(SwinConfig(**encoder_config.to_dict())).to(dtype)
    swin.load_state_dict(swin_state)
    # lm_mode "frozen": ReportModel freezes both models and trains the projector; LoRA goes on below.
    frozen = dataclasses.replace(report, lm_mode="frozen", encoder_mode="frozen")
    model = ReportModel(HFSwinEncoder(swin), HFLanguageModel(hf_lm), tokenizer, frozen).to(device)
    model.proj.load_state_dict(projector["proj"])
    model.proj_norm.load_state_dict(projector["proj_norm"])
    if lora_backend == "auto":  # peft is installed on the GPU machine, not necessarily elsewhere
        lora_backend = "peft" if importlib.util.find_spec("peft") else "vision.lora"
    if lora_backend == "peft":
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=report.lora_r, lora_alpha=report.lora_alpha, lora_dropout=report.lora_dropout,
                            target_modules=HF_LORA_TARGETS, bias="none")
        model.lm.hf = get_peft_model(hf_lm, config)  # float32 adapters on the bf16 base (peft's default)
    else:
        apply_lora(hf_lm, dict.fromkeys(HF_LORA_TARGETS), report.lora_r, report.lora_alpha, report.lora_dropout)
    return model, f"transformers+{lora_backend}"


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
def train_step(model, optimizer, images, reports, last: dict) -> None:
    loss = model(images, reports)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    last["loss"] = loss.detach()


def sequence_length(model: ReportModel, images, reports) -> int:
    with torch.no_grad():
        return model.training_inputs(images[:1], reports[:1])[0].shape[1]


def measure(impl: str, model: ReportModel, images, reports, steps: int, cuda: bool) -> dict:
    """One implementation's row; the peak VRAM counts from here (its weights are already resident)."""
    seq = sequence_length(model, images, reports)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model.eval()  # no dropout / stochastic depth: the two implementations must give the same loss here
    with torch.no_grad():
        loss0 = model(images, reports).item()
    model.train()
    optimizer, _ = make_optimizer(model, lr=1e-4, weight_decay=0.05, total_steps=WARMUP + steps)
    not_fp32 = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if not_fp32:
        raise RuntimeError(f"{impl}: trained tensors without float32 master weights: {not_fp32[:5]}")
    last = {}
    ms = time_cuda(lambda: train_step(model, optimizer, images, reports, last), warmup=WARMUP, iters=steps)
    batch = images.shape[0]
    row = dict(impl=impl, batch=batch, seq_len=seq, step_ms=ms, tokens_per_s=batch * seq * 1e3 / ms,
               peak_vram_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
               loss_step0=loss0, loss_last=last["loss"].item(), adapters_layer0=adapter_shapes(model))
    print(markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    return row


def free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny LM + tiny Swin on the CPU in fp32 (smoke run)")
    ap.add_argument("--batch-size", type=int, help="studies per step (default 8; --tiny: 2)")
    ap.add_argument("--steps", type=int, help="timed steps after 3 warm-up steps (default 10; --tiny: 2)")
    ap.add_argument("--hf-lora", choices=["auto", "peft", "vision.lora"], default="auto",
                    help="LoRA on the transformers side (auto: peft when installed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    cuda, device, dtype = bench_device(ap, args.tiny)
    lm_preset, encoder_preset = ("tiny", "tiny") if args.tiny else ("stablelm-3b-4e1t", "swin-base")
    batch = args.batch_size or (2 if args.tiny else 8)
    steps = args.steps or (2 if args.tiny else 10)
    lm_config, encoder_config = preset(lm_preset), ENCODER_PRESETS[encoder_preset]()
    report = ReportConfig(lm_mode="lora", encoder_mode="frozen", lora_r=16, lora_alpha=16.0, lora_dropout=0.1,
                          max_length=100)
    env = environment()

    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthetic_reports(256, args.seed + 1) + [report.instruction]
        tokenizer_dir = str(build_tokenizer(corpus, Path(tmp), min(TOKENIZER_VOCAB, lm_config.vocab_size)))
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
        spec = {"lm": None, "lm_preset": lm_preset, "encoder": None, "encoder_preset": encoder_preset,
                "tokenizer": tokenizer_dir, "seed": args.seed, "report": report.to_dict()}
        ours = build_model(spec, device, "bf16" if cuda else "fp32")
    swin_state = random_hf_swin_state(encoder_config, args.seed)
    ours.encoder.load_state_dict(convert_hf_state_dict(swin_state, encoder_config))
    images = random_images(batch, encoder_config.image_size, device, dtype, args.seed)
    reports = synthetic_reports(batch, args.seed)
    report_tokens = [min(len(tokenizer.encode(r, add_special_tokens=False)) + 1, report.max_length)
                     for r in reports]

    # The projector as initialised (training moves it) goes to the transformers side, like the frozen weights.
    projector = {"proj": {k: v.detach().clone() for k, v in ours.proj.state_dict().items()},
                 "proj_norm": {k: v.detach().clone() for k, v in ours.proj_norm.state_dict().items()}}
    rows = [measure("stablelm", ours, images, reports, steps, cuda)]
    lm_weights = lm_base_weights(ours.lm)
    del ours
    free(cuda)
    hf, label = build_transformers(lm_weights, lm_config, swin_state, encoder_config, projector, tokenizer, report,
                                   args.hf_lora, device, dtype)
    del lm_weights
    free(cuda)
    rows.append(measure(label, hf, images, reports, steps, cuda))
    del hf
    free(cuda)

    hf_ms = rows[-1]["step_ms"]
    for row in rows:
        row["speedup"] = hf_ms / row["step_ms"]
    ours_loss, hf_loss = rows[0]["loss_step0"], rows[1]["loss_step0"]
    loss_rel_diff = abs(ours_loss - hf_loss) / abs(hf_loss)
    notes = [
        f"step-0 loss (eval mode, identical weights and inputs): stablelm {ours_loss:.5f}, {label} {hf_loss:.5f} "
        f"(relative difference {loss_rel_diff:.2e})",
        "LoRA adapters of layer 0 (trainable counts differ because our fused qkv / gate_up projections carry one "
        f"adapter each): stablelm: {rows[0]['adapters_layer0']}; {label}: {rows[1]['adapters_layer0']}",
        f"sequence: {rows[0]['seq_len']} positions (prompt + visual tokens + {report.max_length} report slots); "
        f"real report tokens per study (with the end token): mean {sum(report_tokens) / len(report_tokens):.1f}",
    ]
    print()
    print(markdown_table(rows, COLUMNS))
    print()
    for note in notes:
        print("-", note)
    if not math.isfinite(loss_rel_diff) or loss_rel_diff > 0.05:
        print(f"WARNING: step-0 losses differ by {loss_rel_diff:.1%}; the two sides are not computing the same thing")
    payload = {"benchmark": "report_train", "env": env, "lm": lm_preset, "encoder": encoder_preset,
               "dtype": str(dtype), "batch": batch, "images_per_study": IMAGES_PER_STUDY, "steps": steps,
               "warmup": WARMUP, "report_config": report.to_dict(), "report_tokens": report_tokens,
               "loss_step0_rel_diff": loss_rel_diff, "notes": notes, "rows": rows}
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
