"""The report model's pipeline under the CLIs: building the model from a spec, run checkpoints, the training loop
and the evaluation loop (generation + metrics).

    model = build_model(spec, "cpu", "fp32")      # spec: LM / encoder / tokenizer locations + ReportConfig dict
    results = train(spec, TrainConfig(epochs=5), annotation, "DATA/images", Path("runs/x"), "cuda")
    model, run = load_run(Path("runs/x/best"), "cuda")
    scores = evaluate(model, loader, "cuda")["scores"]

A spec is a JSON-ready dict ({"lm", "lm_preset", "encoder", "encoder_preset", "tokenizer", "seed", "report",
"dataset", "precision"}); every run checkpoint stores it, so evaluation rebuilds the model from the checkpoint
alone and loads only the trained tensors on top.

A run checkpoint (`runs/x/last`, `runs/x/best`) is a directory that cannot carry code, read without unpickling:
  model.safetensors      the trained tensors only (projector, LayerNorm, adapters or the fine-tuned LM)
  optimizer.safetensors  resume state (last only): AdamW `exp_avg/NAME`, `exp_avg_sq/NAME`, `step/NAME` per
                         trained parameter (and `master/NAME`, its float32 master weight, under bf16-mixed),
                         and the RNG states `rng/cpu`, `rng/cuda:I`
  state.json             {"format": "report-run", "version", "spec", "epoch", "step", "results", "optimizer":
                         AdamW param-group hyperparameters with parameter names, "scheduler": LambdaLR counters}
  tokenizer/             a copy of the run's tokenizer files, so the run directory can move
It is written atomically (stablelm.checkpoint.atomic_dir: a temporary directory renamed into place, removed on
failure or a signal). Paths in the spec are absolute, `~` expanded. OUT/train_log.jsonl has one line per step
({"epoch", "step", "loss", "lr"}).

Under torchrun `train` runs data parallel (vision/distributed.py: DDP or FSDP2, --batch-size the global batch,
the same loss curve as one process, rank-0 checkpoints that resume at any world size).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

import stablelm
from stablelm.checkpoint import atomic_dir, copy_tokenizer_files
from stablelm.convert import CheckpointError, read_json, read_tensor_file
from stablelm.lora import make_optimizer
from stablelm.optim import MasterAdamW
from stablelm.tokenizer import Tokenizer

from . import distributed
from .data import ReportDataset, collate_reports
from .metrics import METRICS, compute_scores, meteor_backend, weighted_score
from .report_model import COMPILE_MODES, ReportConfig, ReportModel, check_compile
from .swin import SwinEncoder, swin_base_224, swin_tiny_test
from .swin_checkpoint import load_converted, load_hf_swin

ENCODER_PRESETS = {"swin-base": swin_base_224, "tiny": swin_tiny_test}
# fp32: everything float32. bf16: frozen weights bf16, trained tensors float32 (their own master weights).
# bf16-mixed: every weight bf16, trained ones too (bf16 matmuls through the backward as well), float32 master
# weights and moments in the optimizer (stablelm/optim.py's MasterAdamW): full fine-tuning at bf16 speed.
PRECISIONS = ("fp32", "bf16", "bf16-mixed")
RUN_FORMAT = "report-run"
RUN_VERSION = 1
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, TOKENIZER_DIR = ("model.safetensors", "optimizer.safetensors",
                                                         "state.json", "tokenizer")
ADAMW_STATE = ("exp_avg", "exp_avg_sq", "step")
MASTER_STATE = "master"  # MasterAdamW's float32 master weight, beside ADAMW_STATE (precision bf16-mixed)


@dataclass
class TrainConfig:
    """How a run trains and picks its best checkpoint. `help` metadata is what `python -m vision.train` shows."""
    epochs: int = field(default=5, metadata={"help": "training epochs"})
    batch_size: int = field(default=8, metadata={
        "help": "studies per step over all ranks (under torchrun each rank takes batch-size / world-size, which "
                "must divide); the validation batch the same way"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate (cosine decay to 1%%)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    val_limit: int | None = field(default=None, metadata={"help": "validate on at most this many studies"})
    score_weights: dict[str, float] = field(default_factory=lambda: {"BLEU_4": 0.5, "CIDEr": 0.5}, metadata={
        "help": "weighted sum of validation metrics that picks the best checkpoint"})
    augment: bool = field(default=False, metadata={
        "help": "R2Gen-style random crop for training images (R2GenGPT trains without augmentation)"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and the shuffles"})
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    data_parallel: str = field(default="auto", metadata={
        "choices": distributed.DATA_PARALLEL,
        "help": "under torchrun: DDP over the trained tensors, or FSDP2 fully_shard; auto = fsdp for --lm-mode "
                "full, ddp otherwise"})
    compile: str | None = field(default=None, metadata={
        "choices": COMPILE_MODES,
        "help": "run the LM part of the loss (projector, prompt, StableLM + adapters, head + loss) under "
                "torch.compile in this mode (reduce-overhead: also CUDA graphs); unset: eager. The first steps "
                "compile (minutes on a GPU); not under FSDP"})
    compile_backend: str = field(default="inductor", metadata={
        "help": "torch.compile backend of --compile; only inductor takes the CUDA-graph / autotune modes "
                "(aot_eager, eager: quick CPU checks)"})
    compile_memory_budget: float | None = field(default=None, metadata={
        "help": "with --compile: the fraction in (0, 1] of the activations the compiled step would save for the "
                "backward that it may save; the rest is recomputed in the backward (less memory, some speed). "
                "Unset: the partitioner's own choice"})

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.workers < 0:
            bad("workers", "must be >= 0")
        if self.data_parallel not in distributed.DATA_PARALLEL:
            bad("data_parallel", f"choose one of {distributed.DATA_PARALLEL}")
        try:
            check_compile(self.compile, self.compile_backend, self.compile_memory_budget)
        except ValueError as e:
            raise ValueError(f"TrainConfig: {e}") from None
        if self.val_limit is not None and self.val_limit < 1:
            bad("val_limit", "must be >= 1 (or unset for the whole split)")
        if not self.lr > 0 or self.weight_decay < 0:
            bad("lr" if not self.lr > 0 else "weight_decay", "must be > 0 (lr) / >= 0 (weight_decay)")
        if not self.score_weights:
            bad("score_weights", f"name at least one metric of {list(METRICS)}")
        unknown = sorted(set(self.score_weights) - set(METRICS))
        if unknown:
            bad("score_weights", f"unknown metric(s) {unknown}; valid names: {list(METRICS)}")


# ---------------------------------------------------------------------------- building
def build_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained on `texts` (for random-weight LMs, which have no tokenizer of their own)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return out_dir


def resolve_path(path: str | Path | None) -> str | None:
    """`~` expanded, absolute: what a spec stores, so a run works from any directory."""
    return None if path is None else str(Path(path).expanduser().resolve())


def build_model(spec: dict, device, precision: str) -> ReportModel:
    """Rebuild a ReportModel from a spec (also stored in every checkpoint)."""
    if spec.get("lm"):
        lm = stablelm.load(Path(spec["lm"]).expanduser(), device=device)
    elif spec["lm_preset"] not in stablelm.PRESETS:
        raise ValueError(f"lm_preset={spec['lm_preset']!r}: choose one of {sorted(stablelm.PRESETS)}")
    else:
        lm = stablelm.StableLM.random(stablelm.preset(spec["lm_preset"]), seed=spec.get("seed", 0), device=device)
    enc_path = spec.get("encoder")
    if enc_path:
        enc_path = Path(enc_path).expanduser()
        encoder = load_converted(enc_path) if (enc_path / "encoder.safetensors").exists() else load_hf_swin(enc_path)
    elif spec["encoder_preset"] not in ENCODER_PRESETS:
        raise ValueError(f"encoder_preset={spec['encoder_preset']!r}: choose one of {sorted(ENCODER_PRESETS)}")
    else:
        torch.manual_seed(spec.get("seed", 0))
        encoder = SwinEncoder(ENCODER_PRESETS[spec["encoder_preset"]]())
    encoder = encoder.to(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}")
    if precision != "fp32":
        lm.to(torch.bfloat16)
        encoder.to(torch.bfloat16)
    tokenizer = Tokenizer.from_dir(tokenizer_source(spec))
    if tokenizer.vocab_size > lm.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the LM only {lm.config.vocab_size}")
    model = ReportModel(encoder, lm, tokenizer, ReportConfig.from_dict(spec["report"])).to(device)
    set_trained_dtype(model, precision)
    return model


def set_trained_dtype(model: ReportModel, precision: str) -> None:
    """What trains (projector, adapters, the fine-tuned LM) keeps float32 weights, which are its master weights;
    under bf16-mixed it trains in bf16 and the optimizer (MasterAdamW) keeps the float32 masters."""
    trained_dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(trained_dtype)


def tokenizer_source(spec: dict) -> Path:
    """The directory the spec's tokenizer is read from: its own, else the LM's."""
    source = spec.get("tokenizer") or spec.get("lm")
    if not source:
        raise ValueError("the spec names neither a tokenizer nor an LM directory to read one from")
    return Path(source).expanduser()


# ---------------------------------------------------------------------------- checkpoints
class ValidationFailed(RuntimeError):
    """Validation raised after an epoch; that epoch's `last` checkpoint was written before it ran."""


@dataclass
class RunCheckpoint:
    """What load_run_checkpoint read. `optimizer` / `scheduler` are state dicts ready for load_state_dict (None in a
    checkpoint written without them, e.g. `best`); `spec["tokenizer"]` points at the checkpoint's own copy."""
    directory: Path
    spec: dict
    epoch: int
    step: int
    results: dict | None
    trained: dict[str, torch.Tensor]
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)


def _trained_names(model: ReportModel) -> list[str]:
    # The order make_optimizer hands parameters to AdamW, i.e. the optimizer's parameter indices.
    return [n for n, p in model.named_parameters() if p.requires_grad]


def named_optimizer_state(model: ReportModel, optimizer) -> dict:
    """The optimizer's state dict with parameters by name ({"state": {name: ...}, "param_groups": [{"params":
    [names], ...}]}), the layout torch.distributed.checkpoint's get_optimizer_state_dict returns too."""
    names = _trained_names(model)
    sd = optimizer.state_dict()
    return {"state": {names[i]: values for i, values in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def save_run_checkpoint(directory: Path, model: ReportModel, spec: dict, epoch: int, step: int,
                        results: dict | None = None, optimizer=None, scheduler=None, *,
                        trained: dict | None = None, optimizer_state: dict | None = None) -> None:
    """Write a run checkpoint directory (layout in the module docstring) atomically, replacing an earlier one.
    With `optimizer` and `scheduler` it also holds what resuming needs (optimizer state and RNG states).
    `trained` / `optimizer_state` (by parameter name): tensors already gathered whole (FSDP), instead of the
    model's and the optimizer's own."""
    directory = Path(directory).expanduser()
    state = {"format": RUN_FORMAT, "version": RUN_VERSION, "spec": spec, "epoch": epoch, "step": step,
             "results": results, "optimizer": None, "scheduler": None}
    trained = model.trainable_state_dict() if trained is None else trained
    trained = {k: v.detach().cpu().contiguous() for k, v in trained.items()}
    resume = {}
    if optimizer is not None:
        sd = named_optimizer_state(model, optimizer) if optimizer_state is None else optimizer_state
        for name, values in sd["state"].items():
            for key in ADAMW_STATE + ((MASTER_STATE,) if MASTER_STATE in values else ()):
                value = values[key]
                resume[f"{key}/{name}"] = (value if torch.is_tensor(value)
                                           else torch.tensor(float(value))).detach().cpu().contiguous()
        state["optimizer"] = {"param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                                "params": list(g["params"])} for g in sd["param_groups"]]}
        state["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        resume["rng/cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            # Under a process group only this rank's GPU (touching the others would open a context on each).
            gpus = [torch.cuda.current_device()] if dist.is_initialized() else range(torch.cuda.device_count())
            for i in gpus:
                resume[f"rng/cuda:{i}"] = torch.cuda.get_rng_state(i)
    with atomic_dir(directory, overwrite=True) as tmp:
        save_file(trained, str(tmp / MODEL_FILE), metadata={"format": RUN_FORMAT})
        if resume:
            save_file(resume, str(tmp / OPTIMIZER_FILE), metadata={"format": RUN_FORMAT})
        (tmp / TOKENIZER_DIR).mkdir()
        if not copy_tokenizer_files(tokenizer_source(spec), tmp / TOKENIZER_DIR):
            raise FileNotFoundError(f"{tokenizer_source(spec)}: no tokenizer files to copy into the checkpoint")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_run_checkpoint(directory: str | Path) -> RunCheckpoint:
    """Read a run checkpoint written by save_run_checkpoint. Only JSON and safetensors are parsed (nothing is
    unpickled); anything else, a truncated file or a foreign one is a CheckpointError naming the file."""
    directory = Path(directory).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"run checkpoint not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a run checkpoint directory (expected {STATE_FILE}, {MODEL_FILE} "
                              f"and {TOKENIZER_DIR}/ in a directory such as runs/x/last); files of other formats, "
                              f"pickles included, are never loaded")
    for name in (STATE_FILE, MODEL_FILE, TOKENIZER_DIR):
        if not (directory / name).exists():
            raise CheckpointError(f"{directory}: no {name}; not a run checkpoint written by vision.train")
    state = read_json(directory / STATE_FILE)
    if state.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{directory / STATE_FILE}: format {state.get('format')!r}, not {RUN_FORMAT!r}")
    if state.get("version") != RUN_VERSION:
        raise CheckpointError(f"{directory / STATE_FILE}: version {state.get('version')!r} unsupported (expected "
                              f"{RUN_VERSION})")
    for key, kinds in (("spec", dict), ("epoch", int), ("step", int), ("results", (dict, type(None))),
                       ("optimizer", (dict, type(None))), ("scheduler", (dict, type(None)))):
        if not isinstance(state.get(key), kinds):
            raise CheckpointError(f"{directory / STATE_FILE}: {key!r} has the wrong type "
                                  f"({type(state.get(key)).__name__})")
    spec = {**state["spec"], "tokenizer": str(directory / TOKENIZER_DIR)}
    run = RunCheckpoint(directory, spec, state["epoch"], state["step"], state.get("results"),
                        read_tensor_file(directory / MODEL_FILE))
    if state.get("optimizer") is not None:
        if not (directory / OPTIMIZER_FILE).is_file():
            raise CheckpointError(f"{directory}: {STATE_FILE} has optimizer settings but {OPTIMIZER_FILE} is missing")
        resume = read_tensor_file(directory / OPTIMIZER_FILE)
        run.optimizer = _optimizer_state(state["optimizer"], resume, directory / OPTIMIZER_FILE)
        run.scheduler = state.get("scheduler")
        run.rng = {k.removeprefix("rng/"): v for k, v in resume.items() if k.startswith("rng/")}
    return run


def _optimizer_state(saved: dict, tensors: dict, path: Path) -> dict:
    """A torch optimizer state dict (parameters still by name; restore_training maps them to indices)."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise CheckpointError(f"{path.parent / STATE_FILE}: optimizer.param_groups must list groups with 'params'")
    state = {}
    for group in groups:
        for name in group["params"]:
            missing = [k for k in ADAMW_STATE if f"{k}/{name}" not in tensors]
            if len(missing) == len(ADAMW_STATE):
                continue  # never stepped (no gradient yet): AdamW has no state for it either
            if missing:
                raise CheckpointError(f"{path}: {name} lacks {missing}")
            state[name] = {k: tensors[f"{k}/{name}"] for k in ADAMW_STATE + (MASTER_STATE,) if f"{k}/{name}" in tensors}
    return {"state": state, "param_groups": groups}


def load_trained(model: ReportModel, trained: dict) -> None:
    """Put a checkpoint's trained tensors into the model; names and shapes must match exactly."""
    expected = {k: v.shape for k, v in model.trainable_state_dict().items()}
    missing, extra = sorted(set(expected) - set(trained)), sorted(set(trained) - set(expected))
    wrong = [f"{k}: {tuple(trained[k].shape)} != {tuple(expected[k])}" for k in sorted(set(expected) & set(trained))
             if trained[k].shape != expected[k]]
    if missing or extra or wrong:
        raise CheckpointError(f"checkpoint does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}, "
                              f"wrong shapes {wrong[:5]}")
    params = dict(model.named_parameters())
    model.load_state_dict({k: distributed.like_parameter(v, params[k]) for k, v in trained.items()}, strict=False)


def require_resume_state(run: RunCheckpoint) -> None:
    if run.optimizer is None:
        raise CheckpointError(f"{run.directory}: holds no optimizer state (resume from a run's `last` checkpoint)")


# AdamW settings that choose an implementation, not a result: a run saved on the CPU resumes fused on a GPU.
OPTIMIZER_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def restore_training(run: RunCheckpoint, model: ReportModel, optimizer, scheduler) -> None:
    """Continue where `run` stopped: trained tensors, AdamW state and hyperparameters, schedule, RNG states."""
    require_resume_state(run)
    load_trained(model, run.trained)
    names = _trained_names(model)
    index = {n: i for i, n in enumerate(names)}
    current = optimizer.state_dict()
    groups = run.optimizer["param_groups"]
    if len(groups) != len(current["param_groups"]) or any(sorted(g["params"]) != sorted(names[i] for i in c["params"])
                                                         for g, c in zip(groups, current["param_groups"])):
        raise CheckpointError(f"{run.directory}: the optimizer's parameter groups do not fit this model")
    param_groups = []
    for g, c in zip(groups, current["param_groups"]):
        # Only the hyperparameters this optimizer has, each of the type it has (JSON turned tuples into lists). How
        # the step is computed (fused on CUDA, foreach, ...) is this machine's choice, not the saved run's.
        group = {}
        for key, now in c.items():
            value = now if key in OPTIMIZER_IMPLEMENTATION else g.get(key, now)
            value = tuple(value) if isinstance(now, tuple) and isinstance(value, list) else value
            if key != "params" and type(value) is not type(now) and not (type(now) is float and type(value) is int):
                raise CheckpointError(f"{run.directory / STATE_FILE}: optimizer setting {key}={value!r} is not "
                                      f"a {type(now).__name__}")
            group[key] = value
        param_groups.append({**group, "params": [index[n] for n in g["params"]]})
    params = dict(model.named_parameters())
    for name, values in run.optimizer["state"].items():
        if name not in index:
            raise CheckpointError(f"{run.directory / OPTIMIZER_FILE}: state for {name}, which this model does not "
                                  f"train")
        if (MASTER_STATE in values) != isinstance(optimizer, MasterAdamW):
            raise CheckpointError(f"{run.directory / OPTIMIZER_FILE}: "
                                  + (f"{MASTER_STATE}/{name} is a float32 master weight, which only a bf16-mixed run "
                                     f"keeps" if MASTER_STATE in values else
                                     f"no {MASTER_STATE}/{name}: this bf16-mixed run needs the float32 master weights")
                                  + f" (the run's precision is {run.spec.get('precision')!r})")
        for key in ("exp_avg", "exp_avg_sq") + ((MASTER_STATE,) if MASTER_STATE in values else ()):
            if values[key].shape != params[name].shape:
                raise CheckpointError(f"{run.directory / OPTIMIZER_FILE}: {key}/{name} has shape "
                                      f"{tuple(values[key].shape)}, the parameter {tuple(params[name].shape)}")
    # load_state_dict moves and casts the moments to each parameter's device and dtype (MasterAdamW keeps its
    # state in float32).
    state = {index[n]: {k: distributed.like_parameter(v, params[n]) if k != "step" else v for k, v in values.items()}
             for n, values in run.optimizer["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    # Only the counters this scheduler has, of the types it has: the JSON may not set anything else on it.
    current_schedule = scheduler.state_dict()
    scheduler.load_state_dict({**current_schedule, **{
        k: v for k, v in (run.scheduler or {}).items()
        if k in current_schedule and k != "lr_lambdas" and type(v) is type(current_schedule[k])}})
    if "cpu" in run.rng:
        torch.set_rng_state(run.rng["cpu"])
    for name, rng in run.rng.items():
        if name.startswith("cuda:") and torch.cuda.is_available() and int(name[5:]) < torch.cuda.device_count():
            torch.cuda.set_rng_state(rng, int(name[5:]))


def load_run(directory: str | Path, device, precision: str | None = None) -> tuple[ReportModel, RunCheckpoint]:
    """The model of a run checkpoint (rebuilt from its spec, trained tensors loaded) and what was read.
    precision: default the run's on CUDA, fp32 elsewhere."""
    run = load_run_checkpoint(directory)
    device = torch.device(device)
    if precision is None:
        precision = run.spec.get("precision", "fp32") if device.type == "cuda" else "fp32"
    model = build_model(run.spec, device, precision)
    load_trained(model, run.trained)
    return model, run


def update_run_results(directory: Path, results: dict) -> None:
    """Replace the results a run checkpoint's state.json holds (validation finished after it was written)."""
    state = read_json(directory / STATE_FILE)
    # The temporary goes outside the checkpoint, which must hold only what atomic_dir recorded writing.
    write_json(directory / STATE_FILE, {**state, "results": results}, tmp_dir=directory.parent)


def write_json(path: Path, value, tmp_dir: Path | None = None) -> None:
    """Write `value` as JSON through a temporary (in tmp_dir, default beside `path`) renamed over `path`, so
    readers never see half a file."""
    tmp = (tmp_dir or path.parent) / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(value, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: ReportModel, loader, device, limit: int | None = None, desc="eval", **gen) -> dict:
    """Generate for every study of `loader` and score against the references. Under a process group of several
    ranks every rank calls it with its own share: the samples are gathered (rank order), rank 0 scores them once
    and every rank returns the same result."""
    model.eval()
    samples = []
    main = not dist.is_initialized() or dist.get_rank() == 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not main):
        texts = model.generate(batch["images"].to(device, model.lm.dtype), batch["image_mask"], **gen)
        for sid, ref, hyp in zip(batch["ids"], batch["reports"], texts):
            samples.append({"id": sid, "reference": ref, "generated": hyp})
        if limit and len(samples) >= limit:
            break
    samples = distributed.gather_objects(samples)
    scores = None
    if main:
        scores = compute_scores({s["id"]: [s["reference"]] for s in samples},
                                {s["id"]: [s["generated"]] for s in samples})
    return {"scores": distributed.broadcast_object(scores), "samples": samples}


# ---------------------------------------------------------------------------- training
def check_run_inputs(spec: dict, config: TrainConfig, datasets: list[ReportDataset]) -> None:
    """What can be checked before the first step, so a bad input costs seconds rather than an epoch: the spec's
    paths and report / decoding config, and the header of every image the run will read."""
    ReportConfig.from_dict(spec["report"])
    for key in ("lm", "encoder", "tokenizer"):
        if spec.get(key) and not Path(spec[key]).expanduser().is_dir():
            raise FileNotFoundError(f"--{key} {spec[key]}: no such directory")
    if spec.get("precision") not in PRECISIONS:
        raise ValueError(f"precision={spec.get('precision')!r}: choose one of {PRECISIONS}")
    for dataset in datasets:
        dataset.check_images()


def train(spec: dict, config: TrainConfig, annotation: dict, image_dir, out: Path, device,
          resume: str | Path | None = None) -> dict:
    """Train, validating after every epoch. Each epoch writes OUT/last (before validation, so a failing
    validation loses no training), OUT/best when the weighted validation score improves, and OUT/results.json.
    `resume` continues from a `last` checkpoint. Every input is checked before the first step.
    Under torchrun every rank calls it: data parallel as vision/distributed.py describes, rank 0 writing."""
    out = Path(out).expanduser()
    ranks = distributed.setup(device)
    device = ranks.device
    local_batch = distributed.per_rank_batch(config.batch_size, ranks)
    train_set = ReportDataset(annotation, image_dir, "train", dataset=spec["dataset"], train=config.augment)
    val_set = ReportDataset(annotation, image_dir, "val", dataset=spec["dataset"], train=False)
    check_run_inputs(spec, config, [train_set, val_set])
    run = load_run_checkpoint(resume) if resume else None
    if run is not None:
        require_resume_state(run)
    if config.compile is not None and ranks.distributed and distributed.resolve_mode(
            config.data_parallel, spec["report"]["lm_mode"]) == "fsdp":
        # FSDP2's per-block hooks would have to be traced into the graph: not supported here.
        raise ValueError("TrainConfig.compile: not supported under FSDP (--data-parallel fsdp, or auto with "
                         "--lm-mode full); use --data-parallel ddp or leave --compile unset")
    torch.manual_seed(config.seed)
    model = build_model(spec, device, spec["precision"])
    if config.compile is not None:
        model.compile_loss(config.compile, config.compile_backend, config.compile_memory_budget)
    wrapped = distributed.wrap(model, ranks, config.data_parallel)
    sampler = distributed.train_sampler(train_set, ranks, config.seed)
    # The DataLoader's own generator: iterating a DataLoader draws a seed, which must not come from the global
    # RNG that dropout uses, or validation after an epoch would make a resumed run (saved before validation)
    # diverge.
    gen = torch.Generator().manual_seed(config.seed)
    pin = torch.device(device).type == "cuda"  # pinned batches reach the GPU without a host wait (step_loss)
    train_loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, generator=gen,
                              collate_fn=collate_reports, num_workers=config.workers, drop_last=False, pin_memory=pin)
    val_loader = DataLoader(distributed.validation_share(val_set, ranks, config.val_limit), batch_size=local_batch,
                            collate_fn=collate_reports, num_workers=config.workers,
                            generator=torch.Generator().manual_seed(config.seed))
    optimizer, scheduler = make_optimizer(model, config.lr, config.weight_decay, config.epochs * len(train_loader))
    results = {"spec": spec, "train": dataclasses.asdict(config), "meteor": meteor_backend(), "epochs": [],
               "best": None}
    start_epoch, step = 0, 0
    if run is not None:
        restore_training(run, model, optimizer, scheduler)
        start_epoch, step = run.epoch + 1, run.step
        results = run.results or results
    log = out / "train_log.jsonl"
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        # Steps after the resumed checkpoint (an interrupted epoch) are dropped: they are trained again.
        kept = [line for line in (log.read_text().splitlines() if run is not None and log.exists() else [])
                if json.loads(line)["step"] <= step]
        log.write_text("".join(line + "\n" for line in kept))
        n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"trainable parameters: {n_trained:,} of {sum(p.numel() for p in model.parameters()):,}"
              + (f"; {ranks.world} ranks ({ranks.mode}), {local_batch} studies per rank per step"
                 if ranks.distributed else ""))
    trained_params = [p for p in model.parameters() if p.requires_grad]
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)  # the shuffle of an epoch does not depend on earlier resumes
        gen.manual_seed(config.seed + epoch)
        distributed.seed_rank(ranks, config.seed, epoch)
        model.train()
        losses, t0 = [], time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not ranks.main)
        with open(log, "a") if ranks.main else contextlib.nullcontext() as log_file:
            # Each step's loss is read (and logged) once the next step is launched: reading it at once would make
            # the host wait for the GPU to finish the step, leaving the GPU idle while the next one is launched.
            pending = []

            def log_steps(keep: int) -> None:
                while len(pending) > keep:
                    at, lr, value = pending.pop(0)
                    losses.append(value.item())
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}")
                    if log_file is not None:
                        log_file.write(json.dumps({"epoch": epoch, "step": at, "loss": losses[-1], "lr": lr}) + "\n")
                        log_file.flush()
            try:
                for batch in bar:
                    loss, logged = distributed.step_loss(wrapped, model, batch, ranks)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(trained_params, 1.0)
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    pending.append((step, scheduler.get_last_lr()[0], logged))
                    log_steps(keep=1)
            finally:  # an interrupted epoch still logs the steps it finished
                log_steps(keep=0)
        record = {"epoch": epoch, "step": step, "train_loss": sum(losses) / max(len(losses), 1),
                  "epoch_seconds": time.perf_counter() - t0, "world_size": ranks.world}
        results["epochs"].append(record)
        save_run_checkpoint_rank0(ranks, out / "last", model, spec, epoch, step, results, optimizer, scheduler)
        try:
            with distributed.full_parameters(model, ranks):
                val = evaluate(model, val_loader, device, desc="validate")
        except Exception as e:
            record["val_error"] = f"{type(e).__name__}: {e}"
            if ranks.main:
                write_json(out / "results.json", results)
            raise ValidationFailed(f"validation after epoch {epoch + 1} failed ({type(e).__name__}: {e}); the "
                                   f"epoch's training is saved in {out / 'last'}: continue with --resume "
                                   f"{out / 'last'}") from e
        score = weighted_score(val["scores"], config.score_weights)
        record.update(val=val["scores"], val_score=score, val_samples=val["samples"][:3])
        if ranks.main:
            print(json.dumps({k: v for k, v in record.items() if k != "val_samples"}))
        if results["best"] is None or score > results["best"]["val_score"]:
            results["best"] = {"epoch": epoch, "val_score": score, "val": val["scores"]}
            save_run_checkpoint_rank0(ranks, out / "best", model, spec, epoch, step, results)
        if ranks.main:
            update_run_results(out / "last", results)  # so a resumed run knows this epoch's score and the best
            write_json(out / "results.json", results)
        ranks.barrier()
    return results


def save_run_checkpoint_rank0(ranks, directory: Path, model, spec, epoch, step, results, optimizer=None,
                              scheduler=None) -> None:
    """save_run_checkpoint on rank 0 (under FSDP after gathering the full tensors on it), then a barrier."""
    trained, optimizer_state = distributed.gathered_state(model, optimizer, ranks)
    if ranks.main:
        save_run_checkpoint(directory, model, spec, epoch, step, results, optimizer, scheduler, trained=trained,
                            optimizer_state=optimizer_state)
    ranks.barrier()
