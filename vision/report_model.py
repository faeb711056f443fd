"""Report-generation model (R2GenGPT design, StableLM as the language model): images -> Swin encoder ->
projector (Linear + LayerNorm) -> visual tokens spliced into the prompt -> StableLM -> report.

Input embeddings for training are `[bos, prompt_before, visual_tokens, prompt_after, report + end]`; labels are
-100 everywhere but the report tokens (padding included, found from the attention mask because the pad id is
the end id). Generation starts from `[bos, prompt_before, visual_tokens, prompt_after]` and goes through
stablelm.generate with input embeddings, so it uses the same KV cache, kernels and beam search as text.

Training can run the LM part of the loss compiled (`compile_loss`, TrainConfig.compile): the eager step launches
thousands of small kernels and leaves the GPU idle between them; under torch.compile the projector, prompt wrap,
StableLM with its adapters, head and loss become one graph of fused kernels (in reduce-overhead mode replayed
from CUDA graphs). The frozen encoder stays eager.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor
from torch import nn

from stablelm import ops
from stablelm.generate import GenerationConfig, generate
from stablelm.lora import LM_TARGETS, apply_lora, peft_targets
from stablelm.model import StableLM, StableLMModel
from stablelm.quantize import QUANTIZED_LINEARS

PROMPT_TEMPLATE = "Human: <Img><ImageHere></Img> {instruction} \nAssistant:"
DEFAULT_INSTRUCTION = "Generate a comprehensive and detailed diagnosis report for this chest xray image."
ENCODER_MODES = ("frozen", "lora")
LM_MODES = ("frozen", "lora", "full")
# fused: one adapter per fused projection (qkv, o, gate_up, down: 4 per layer); peft: one on each of q/k/v/o/gate/
# up/down (7 per layer, peft's layout and parameter count), computed through the fused projections (stablelm/lora.py).
LORA_LAYOUTS = ("fused", "peft")
# GenerationConfig fields ReportModel.generate sets itself: stop and pad ids (the tokenizer's end id), and one
# plain tensor of ids per study back from stablelm.generate, which it decodes into one report each.
GENERATION_OUTPUT = {"num_return_sequences": 1, "return_dict_in_generate": False, "output_scores": False,
                     "output_logits": False}
GENERATION_SET_BY_MODEL = ("stop_ids", "pad_id", *GENERATION_OUTPUT)
# torch.compile modes of the compiled LM loss (ReportModel.compile_loss): inductor's own list.
COMPILE_MODES = tuple(torch._inductor.list_mode_options())
# The op implementations inside the compiled LM loss. The default CUDA ops are Triton kernels behind
# autograd.Functions, launched from Python: inductor could not fuse across them, and dynamo does not trace their
# launchers (tried on the CPU through the interpreter: tracing fails in Triton's launcher; not tried on CUDA). The
# pure-PyTorch references trace into one graph that inductor fuses and generates kernels for; attention takes SDPA,
# which inductor calls as the flash / memory-efficient kernel (the reference materialises a float32 score matrix).
COMPILED_OPS = {**{op: "torch" for op in ops.CUDA_PREFERENCE}, "attention": "sdpa"}


# The backends whose AOT-autograd partitioner (min-cut rematerialisation) reads an activation memory budget.
MEMORY_BUDGET_BACKENDS = ("inductor", "aot_eager_decomp_partition")


def check_compile(mode: str | None, backend: str, memory_budget: float | None = None) -> None:
    """Raise ValueError unless (mode, backend, memory_budget) is a compile setting compile_loss takes (mode None:
    eager)."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile={mode!r}: choose one of {COMPILE_MODES} (or leave it unset: eager)")
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"compile_backend={backend!r}: not a dynamo backend (torch._dynamo.list_backends(), e.g. "
                         f"'inductor', 'aot_eager', 'eager')")
    if mode not in (None, "default") and backend != "inductor":
        raise ValueError(f"compile={mode!r} is an inductor mode; compile_backend={backend!r} takes only 'default'")
    if memory_budget is not None:
        if mode is None:
            raise ValueError(f"compile_memory_budget={memory_budget!r} needs compile set (it budgets the compiled "
                             "step's saved activations)")
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) \
                or not 0 < memory_budget <= 1:
            raise ValueError(f"compile_memory_budget={memory_budget!r}: must be a fraction in (0, 1]")
        if backend not in MEMORY_BUDGET_BACKENDS:
            raise ValueError(f"compile_memory_budget: compile_backend={backend!r} does not read it; use one of "
                             f"{MEMORY_BUDGET_BACKENDS}")


def report_generation() -> GenerationConfig:
    """R2GenGPT's decoding (beams 3, 80..120 new tokens) with the integration guide's repetition penalty 1.2.
    stop_ids / pad_id stay unset (GENERATION_SET_BY_MODEL)."""
    return GenerationConfig(num_beams=3, min_new_tokens=80, max_new_tokens=120, repetition_penalty=1.2)


@dataclass
class ReportConfig:
    """The report model's settings. `help` metadata is what the CLIs show (vision.cli builds flags from fields)."""
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"help": "the prompt's instruction"})
    global_only: bool = field(default=False, metadata={"help": "one pooled visual token instead of the patch tokens"})
    encoder_mode: str = field(default="frozen", metadata={"choices": ENCODER_MODES, "help": "what trains in Swin"})
    lm_mode: str = field(default="frozen", metadata={"choices": LM_MODES, "help": "what trains in the LM"})
    lora_r: int = field(default=16, metadata={"help": "LM LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LM LoRA alpha"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LM LoRA dropout"})
    lora_layout: str = field(default="fused", metadata={
        "choices": LORA_LAYOUTS,
        "help": "LM adapters: one per fused qkv/o/gate_up/down, or peft's q/k/v/o/gate/up/down"})
    vis_lora_r: int = field(default=16, metadata={"help": "encoder LoRA rank"})
    vis_lora_alpha: float = field(default=16.0, metadata={"help": "encoder LoRA alpha"})
    vis_lora_dropout: float = field(default=0.1, metadata={"help": "encoder LoRA dropout"})
    max_length: int = field(default=100, metadata={"help": "report tokens (incl. the end token) in training"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    generation: GenerationConfig = field(default_factory=report_generation)

    def __post_init__(self):
        if self.encoder_mode not in ENCODER_MODES:
            raise ValueError(f"encoder_mode={self.encoder_mode!r}: choose one of {ENCODER_MODES}")
        if self.lm_mode not in LM_MODES:
            raise ValueError(f"lm_mode={self.lm_mode!r}: choose one of {LM_MODES}")
        if self.lora_layout not in LORA_LAYOUTS:
            raise ValueError(f"lora_layout={self.lora_layout!r}: choose one of {LORA_LAYOUTS}")
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}: must be >= 2 (a report token and the end token)")

    def to_dict(self) -> dict:
        """JSON-ready fields, `generation` as a nested dict (from_dict reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReportConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ReportConfig: unknown fields {unknown}; valid fields: {sorted(names)}")
        d = dict(d)
        if "generation" in d:
            d["generation"] = GenerationConfig().replace(**d["generation"])
        return cls(**d)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the GPU: to CUDA from pinned memory, queued behind the GPU's
    work (a blocking copy from pageable memory first waits for the stream to drain, stalling the host that
    should be launching the step's kernels)."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _check_batch(images: torch.Tensor, reports: list[str]) -> None:
    if len(reports) != images.shape[0]:
        raise ValueError(f"{len(reports)} reports for {images.shape[0]} studies")


class ReportModel(nn.Module):
    def __init__(self, encoder: nn.Module, lm: nn.Module, tokenizer, config: ReportConfig | None = None):
        super().__init__()
        self.config = config or ReportConfig()
        self.encoder, self.lm, self.tokenizer = encoder, lm, tokenizer
        hidden = lm.config.hidden_size
        self.proj = nn.Linear(encoder.num_features, hidden)
        self.proj_norm = nn.LayerNorm(hidden)
        before, after = PROMPT_TEMPLATE.format(instruction=self.config.instruction).split("<ImageHere>")
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self.register_buffer("before_ids", torch.tensor(bos + tokenizer.encode(before, add_special_tokens=False)),
                             persistent=False)
        self.register_buffer("after_ids", torch.tensor(tokenizer.encode(after, add_special_tokens=False)),
                             persistent=False)
        self.end_id = tokenizer.eos_id
        self._compiled_lm_loss = None
        self._compile_memory_budget = None
        self._set_trainable()

    # ------------------------------------------------------------------ training modes
    def _set_trainable(self):
        c = self.config
        for p in self.parameters():
            p.requires_grad_(False)
        if c.encoder_mode == "lora":
            apply_lora(self.encoder, self.encoder.lora_targets(), c.vis_lora_r, c.vis_lora_alpha, c.vis_lora_dropout)
        if c.lm_mode == "lora":
            # Over a quantized LM (int8 / int4 / nf4 converted dir) this is QLoRA: the adapters wrap the frozen
            # QuantLinear / NF4Linear modules, whose forward is differentiable in its input.
            if c.lora_layout == "peft":
                apply_lora(self.lm, peft_targets(self.lm.config), c.lora_r, c.lora_alpha, c.lora_dropout,
                           separate=True)
            else:
                apply_lora(self.lm, LM_TARGETS, c.lora_r, c.lora_alpha, c.lora_dropout)
        elif c.lm_mode == "full":
            if any(isinstance(m, QUANTIZED_LINEARS) for m in self.lm.modules()):
                raise ValueError("lm_mode='full' needs a float LM: this one is quantized (its linear weights are "
                                 "frozen buffers); use lm_mode='lora' (QLoRA) or a float checkpoint")
            for p in self.lm.parameters():
                p.requires_grad_(True)
        for p in list(self.proj.parameters()) + list(self.proj_norm.parameters()):
            p.requires_grad_(True)
        self.lm.gradient_checkpointing = c.gradient_checkpointing
        if hasattr(self.encoder, "gradient_checkpointing"):
            self.encoder.gradient_checkpointing = c.gradient_checkpointing

    def trainable_state_dict(self) -> dict:
        """Only the tensors that train (projector, LayerNorm, adapters or the fine-tuned LM)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t for n, t in self.state_dict().items() if n in names}

    # ------------------------------------------------------------------ embeddings
    def encoder_features(self, images: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, n_img, 3, H, W] (+ image_mask [B, n_img]) -> encoder features [B, T, features], before the
        projector. Each image is encoded on its own; a study's token sequences are averaged over its real images."""
        if images.dim() != 5:
            raise ValueError(f"images must be [batch, n_images, 3, H, W], got {tuple(images.shape)}")
        B, n = images.shape[:2]
        # The mask is read on the host (which images to encode): a CPU mask (the data loader's) costs nothing, a
        # GPU one a wait for the GPU. With every image real, nothing is read and no image is selected.
        mask = None if image_mask is None else image_mask.bool().cpu()
        if mask is not None and mask.shape != (B, n):
            raise ValueError(f"image_mask shape {tuple(mask.shape)} != {(B, n)}")
        if mask is not None and not mask.any(1).all():
            raise ValueError("every study needs at least one image")
        if mask is None or mask.all():
            feats = self._image_features(images.flatten(0, 1))
            return feats.view(B, n, *feats.shape[1:]).mean(1)
        real = to_device(mask.flatten().nonzero().squeeze(1), images.device)
        feats = self._image_features(images.flatten(0, 1).index_select(0, real))
        per_study = feats.new_zeros(B * n, *feats.shape[1:]).index_copy_(0, real, feats).view(B, n, *feats.shape[1:])
        w = to_device(mask, images.device).to(feats.dtype)[:, :, None, None]
        return (per_study * w).sum(1) / w.sum(1)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> per-image features [N, T, features] (the pooled token alone with global_only)."""
        tokens, pooled = self.encoder(images)
        return pooled[:, None] if self.config.global_only else tokens

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features -> visual tokens [B, T, hidden] (the trained projector and its LayerNorm)."""
        # The frozen encoder may run in bf16 while the trainable projector keeps float32 weights.
        return self.proj_norm(self.proj(features.to(self.proj.weight.dtype)))

    def encode_images(self, images: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, n_img, 3, H, W] (+ image_mask [B, n_img]) -> visual tokens [B, T, hidden]."""
        return self.project(self.encoder_features(images, image_mask))

    def prompt_embeds(self, visual: torch.Tensor) -> torch.Tensor:
        B = visual.shape[0]
        embed = self.lm.embed
        before = embed(self.before_ids)[None].expand(B, -1, -1)
        after = embed(self.after_ids)[None].expand(B, -1, -1)
        return torch.cat([before, visual.to(before.dtype), after], dim=1)

    def tokenize_reports(self, reports: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Report ids + end id, right padded / truncated to max_length, and their mask."""
        L = self.config.max_length
        ids = torch.full((len(reports), L), self.end_id, dtype=torch.long)
        mask = torch.zeros(len(reports), L, dtype=torch.long)
        for i, text in enumerate(reports):
            t = (self.tokenizer.encode(text, add_special_tokens=False) + [self.end_id])[:L]
            ids[i, :len(t)] = torch.tensor(t)
            mask[i, :len(t)] = 1
        return to_device(ids, device), to_device(mask, device)

    # ------------------------------------------------------------------ training / generation
    def report_embeds(self, features: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt embeds, prompt + report embeds) from encoder features and tokenized reports: the one assembly
        of the LM's input that training_inputs (labels and mask for another LM; tests) and lm_loss share."""
        prompt = self.prompt_embeds(self.project(features))
        return prompt, torch.cat([prompt, self.lm.embed(ids)], dim=1)

    def training_inputs(self, images, reports: list[str], image_mask=None):
        """(input embeds, labels, attention mask) of `[bos, prompt_before, visual, prompt_after, report + end]`,
        reports right padded; labels are -100 on everything but the report and its end token."""
        _check_batch(images, reports)
        ids, mask = self.tokenize_reports(reports, images.device)
        prompt, embeds = self.report_embeds(self.encoder_features(images, image_mask), ids)
        labels = torch.cat([torch.full(prompt.shape[:2], -100, dtype=torch.long, device=ids.device),
                            ids.masked_fill(mask == 0, -100)], dim=1)
        attention_mask = torch.cat([torch.ones(prompt.shape[:2], dtype=torch.long, device=ids.device), mask], 1)
        return embeds, labels, attention_mask

    def forward(self, images, reports: list[str], image_mask=None) -> torch.Tensor:
        """Mean cross-entropy over the report tokens (next-token prediction). With this project's StableLM it is
        lm_loss, eager or (after compile_loss) compiled: nothing in it is read back to the host, so a step never
        waits for the GPU; the logits are computed at the report positions (padding included, labelled -100),
        head and loss fused. Another LM behind ReportModel's interface (the training benchmark's transformers
        peer) gets training_inputs and its own loss."""
        if not isinstance(self.lm, StableLM):
            embeds, labels, attention_mask = self.training_inputs(images, reports, image_mask)
            return self.lm.loss(input_embeds=embeds, attention_mask=attention_mask, labels=labels)
        _check_batch(images, reports)
        features = self.encoder_features(images, image_mask)  # outside the compiled graph (a frozen encoder)
        ids, mask = self.tokenize_reports(reports, images.device)
        if self._compiled_lm_loss is None:
            return self.lm_loss(features, ids, mask)
        budget = (contextlib.nullcontext() if self._compile_memory_budget is None else
                  torch._functorch.config.patch(activation_memory_budget=self._compile_memory_budget))
        with ops.using(**COMPILED_OPS), budget:  # the budget is read when a call (re)compiles
            loss = self._compiled_lm_loss(features, ids, mask)
        # A copy outside the graph: under a CUDA-graph mode the graph's own output is overwritten by the next
        # step, and callers keep the loss (logging, bench) past it.
        return loss.clone()

    def lm_loss(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """forward's loss from the encoder features and the tokenized reports (tokenize_reports): projector,
        prompt wrap, StableLM with its adapters, head and cross-entropy; equal to StableLM.loss over
        training_inputs (tests/test_report_model.py). The part compile_loss compiles.

        Every shape in it is static and nothing reads a tensor's values on the host, so dynamo traces it as one
        graph with no graph break (torch._dynamo.explain on the tiny model under COMPILED_OPS, with and without
        gradient checkpointing: 1 graph, 0 breaks; tests/test_report_compile.py): the report fills the last
        max_length positions, so the positions predicting it are one slice, its padding labelled -100 and ignored
        by the loss (where StableLM.loss selects the labelled positions by a boolean mask: a data-dependent
        shape, i.e. a graph break and a host sync); and no attention mask goes to the LM, as right padding under
        the causal mask changes nothing (StableLM.forward reads the mask on the host to find that out)."""
        prompt, embeds = self.report_embeds(features, ids)
        hidden = StableLMModel.forward(self.lm, input_embeds=embeds)  # the backbone: the head is fused below
        h = hidden[:, prompt.shape[1] - 1:-1].flatten(0, 1)  # position t predicts report token t + 1
        return self.lm.head_loss(h, ids.masked_fill(mask == 0, -100).flatten())

    def compile_loss(self, mode: str | None = "default", backend: str = "inductor",
                     memory_budget: float | None = None) -> None:
        """From now on forward runs lm_loss under torch.compile (mode: one of COMPILE_MODES, an inductor mode;
        backend: a dynamo backend, e.g. "aot_eager" for quick CPU tests; mode None: eager again). The encoder
        stays eager. fullgraph: a graph break is an error rather than a silent slowdown; dynamic=False: a
        smaller last batch compiles its own static graph instead of making every shape symbolic. Dropout inside
        the graph: inductor draws its own random numbers (other masks than eager's for the same seed).

        memory_budget (a fraction in (0, 1], MEMORY_BUDGET_BACKENDS only): the share of the activations the
        partitioner's default choice would save for the backward that the compiled step may save
        (torch._functorch.config.activation_memory_budget); it recomputes the rest in the backward, cheapest
        first. On the tiny model on the CPU 0.5 saved 0.68x and 0.1 0.43x of the bytes; the compiled 3B step
        saves ~2 GiB more than eager (bench/report_train.py's -compile-budget row measures what it buys)."""
        check_compile(mode, backend, memory_budget)
        self._compile_memory_budget = memory_budget
        if mode is None:
            self._compiled_lm_loss = None
            return
        if not isinstance(self.lm, StableLM):
            raise ValueError(f"compile_loss needs this project's StableLM, not {type(self.lm).__name__}")
        options = {"mode": mode} if backend == "inductor" else {}
        self._compiled_lm_loss = torch.compile(self.lm_loss, backend=backend, fullgraph=True, dynamic=False,
                                               **options)

    @torch.no_grad()
    def generate(self, images, image_mask=None, **overrides) -> list[str]:
        """Reports for a batch of studies (config.generation, beam search by default; overrides change its
        fields)."""
        changed = sorted(k for k, v in GENERATION_OUTPUT.items() if overrides.get(k, v) != v)
        if changed:
            raise ValueError(f"ReportModel.generate returns one report per study: {changed} cannot be changed")
        kw = {"stop_ids": [self.end_id], "pad_id": self.end_id, **overrides, **GENERATION_OUTPUT}
        embeds = self.prompt_embeds(self.encode_images(images, image_mask)).to(self.lm.dtype)
        out = generate(self.lm, input_embeds=embeds, config=self.config.generation, **kw)
        texts = []
        for row in out.tolist():
            if self.end_id in row:
                row = row[:row.index(self.end_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts
