"""Checkpoint I/O: the converted format (reading, writing atomically), converting whole directories, `load`.

The converted format is a directory with `model.safetensors` (project names: fused `qkv` and `gate_up`; its
metadata records the LAYOUT_FIELDS the weights were converted with, checked against config.json on load),
`config.json` ({"format": "stablelm", "version": 1, "config": StableLMConfig fields, "quantization": null or
{"bits", "group_size"[, "format": "nf4"][, "lm_head": true][, "embed": true]}}), the tokenizer files copied from the
source (chat_template.jinja included) and `.stablelm-output.json`, the list of what was written. The tensor layout
mapping and the reading of Hugging Face directories are stablelm/convert.py's.

"lm_head": true (`convert --quant ... --quantize-head`) means the causal LM's head is quantized as the other linear
layers are; a tied checkpoint then stores a quantized copy of the embedding table as `lm_head.*` beside the float
`embed.weight` (stablelm/quantize.py says why). Without it the head stays float.

"embed": true (`convert --quant int8|int4 --quantize-embedding`) means the embedding table is quantized too, in the
same format as the linear layers (`embed.qweight`, `embed.scales`[, `embed.zeros`] instead of `embed.weight`; load
builds a QuantEmbedding for it): the table's rounding error is added to every token's input activations, for its
bytes (stablelm/quantize.py). Without it the table stays float. Refused for nf4 and for tied checkpoints (their
head multiplies by the table).

Every directory is written by `atomic_dir`: into a temporary beside it, renamed into place at the end, removed on
an error or SIGTERM/SIGHUP/SIGINT; it never replaces a file, the source, or a non-empty directory it did not write.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from . import parallel
from .config import StableLMConfig
from .convert import (LAYOUT_FIELDS, CheckpointError, check_finite_tensor, check_tensors, hf_to_project,
                      meta_model, project_to_hf, read_hf_tensors, read_json, read_tensor_file, tensor_file_metadata)
from .model import Rotary
from .quantize import (NF4_EMBED_REFUSAL, TIED_EMBED_REFUSAL, match_embedding_dtype, quantize_kwargs, quantize_model,
                       quantize_state_dict)

FORMAT = "stablelm"
VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANT_BITS = {"int8": 8, "int4": 4, "nf4": 4}
INT4_GROUP_SIZE = 128
NF4_BLOCK_SIZE = 64  # QLoRA's block; stored as the quantization's group_size, with "format": "nf4"
LAYOUT_KEY = "stablelm_layout"      # model.safetensors metadata: the LAYOUT_FIELDS the weights were converted with
MANIFEST = ".stablelm-output.json"  # what atomic_dir wrote into a directory, so --overwrite knows what it may delete
_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


# ---------------------------------------------------------------- reading
def read_hf_dir(path: str | Path, progress: bool = False, check_finite: bool = False) -> tuple[StableLMConfig, dict]:
    """(config, tensors in the project layout) of a Hugging Face checkpoint directory; check_finite: a NaN/inf in
    a floating tensor is a CheckpointError naming the tensor and its shard."""
    path = Path(path).expanduser()
    cfg = _config(path / "config.json", StableLMConfig.from_hf)
    tensors = read_hf_tensors(path, progress, check_finite)
    try:
        return cfg, hf_to_project(tensors, cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def read_project_dir(path: str | Path, device="cpu", check_finite: bool = False):
    """(StableLMConfig, quantization or None, tensors) of a converted directory; check_finite: as read_hf_dir."""
    cfg, quant, weights = read_project_header(path)
    return cfg, quant, read_tensor_file(weights, device, check_finite)


def read_project_header(path: str | Path):
    """(StableLMConfig, quantization or None, path of model.safetensors) of a converted directory, checked, with
    no tensor read (tensor-parallel ranks read their slices themselves)."""
    path = Path(path).expanduser()
    meta = read_json(path / "config.json")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/config.json is not a converted stablelm checkpoint (run convert_weights.py)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('version')} unsupported (expected {VERSION})")
    cfg = _config(path / "config.json", lambda m: StableLMConfig.from_dict(m["config"]), meta)
    quant = _quantization(meta.get("quantization"), path / "config.json")
    weights = path / "model.safetensors"
    _check_layout(cfg, tensor_file_metadata(weights), path)
    return cfg, quant, weights


def _quantization(quant, path: Path) -> dict | None:
    """config.json's quantization entry, checked: null, or {"bits": 8 | 4, "group_size": int > 0[, "format"]
    [, "lm_head": bool][, "embed": bool (int8 / int4 only)]}."""
    if quant is None:
        return None
    fmt = quant.get("format", "int") if isinstance(quant, dict) else None
    ok = (isinstance(quant, dict) and fmt in ("int", "nf4")
          and quant.get("bits") in ((8, 4) if fmt == "int" else (4,)) and type(quant.get("bits")) is int
          and (quant.get("group_size") is None and quant.get("bits") == 8
               or type(quant.get("group_size")) is int and quant["group_size"] > 0)
          and type(quant.get("lm_head", False)) is bool
          and type(quant.get("embed", False)) is bool and not (quant.get("embed") and fmt != "int"))
    if not ok:
        raise CheckpointError(f"{path}: quantization must be null or {{\"bits\": 8 | 4, \"group_size\": int > 0"
                              f"[, \"format\": \"nf4\"][, \"lm_head\": true | false][, \"embed\": true | false]}} "
                              f"(\"embed\": true with int8 / int4 only), got {quant!r}")
    return quant


def _config(path: Path, parse, meta: dict | None = None) -> StableLMConfig:
    # A config that does not parse is an error about that file.
    try:
        return parse(read_json(path) if meta is None else meta)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def _check_layout(cfg: StableLMConfig, metadata: dict, path: Path) -> None:
    """config.json must still say what the weights were converted with (LAYOUT_FIELDS): a changed head count or
    rotary fraction keeps every shape, so nothing else would notice the forward pass changing."""
    if LAYOUT_KEY not in metadata:
        return  # written before the layout was recorded
    try:
        stored = json.loads(metadata[LAYOUT_KEY])
        changed = [f"{k}: converted with {v!r}, config.json says {getattr(cfg, k)!r}"
                   for k, v in stored.items() if getattr(cfg, k) != v]
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}/model.safetensors: unreadable {LAYOUT_KEY} metadata ({e})") from e
    if changed:
        raise CheckpointError(f"{path}: config.json does not match the weights ({'; '.join(changed)}); convert "
                              f"the checkpoint again instead of editing its config")


def read_config(path: str | Path) -> tuple[StableLMConfig, dict | None]:
    """(config, quantization or None) of a converted or Hugging Face checkpoint directory, checked as load checks
    them (a converted one against the layout its weights record), with no tensor read."""
    path = Path(path).expanduser()
    if is_hf_dir(path):
        return _config(path / "config.json", StableLMConfig.from_hf), None
    cfg, quant, _ = read_project_header(path)
    return cfg, quant


def is_hf_dir(path: str | Path) -> bool:
    cfg = Path(path).expanduser() / "config.json"
    return cfg.exists() and read_json(cfg).get("format") != FORMAT


# ---------------------------------------------------------------- writing
class Interrupted(BaseException):
    """A signal (SIGTERM, SIGHUP, SIGINT) arrived while atomic_dir was writing; like KeyboardInterrupt, it is no
    Exception, so nothing on the way out swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def atomic_dir(dst: str | Path, overwrite: bool = False, src: str | Path | None = None):
    """Yield a new temporary directory beside `dst`; on success it is renamed to `dst`, on any error or catchable
    signal removed, so an interrupted run leaves neither a half-written dst nor the temporary.

    Nothing is touched unless `dst` may be written: it must not be a file, nor be or contain `src`; an existing
    `dst` is replaced only with `overwrite`, and only if it is empty or an earlier output of this function holding
    nothing else. The temporary is `.NAME.tmp-PID-XXXX`; one left by a run that was killed outright (SIGKILL, a
    power cut) is removed here once its PID is gone. Directories get the mode the umask gives (not mkdtemp's 0700).
    """
    dst = _writable_destination(Path(dst), overwrite, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dst)
    with _signals_raise_interrupted():
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir()  # a signal right after this leaves it to the next run's stale-temporary cleanup
        try:
            yield tmp
            _follow_umask(tmp)
            (tmp / MANIFEST).write_text(json.dumps(
                {"written_by": "stablelm", "files": sorted(p.name for p in tmp.iterdir())}, indent=2))
            _move_into_place(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _follow_umask(directory: Path) -> None:
    # mkdir applied the umask to the directory; safetensors writes its files 0600, so give them the same bits.
    mode = directory.stat().st_mode & 0o666
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(mode)


def _writable_destination(dst: Path, overwrite: bool, src) -> Path:
    """dst with symlinks resolved, or FileExistsError saying why it may not be written."""
    dst = dst.expanduser().resolve()
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file, not a directory; nothing was written")
    if src is not None:
        src = Path(src).expanduser().resolve()
        if dst == src or dst in src.parents:
            raise FileExistsError(f"{dst} {'is' if dst == src else 'contains'} the source {src}; write elsewhere")
    if not dst.exists():
        return dst
    if not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite / --overwrite to replace it)")
    entries = {p.name for p in dst.iterdir()}
    written = _written_here(dst)
    if entries and written is None:
        raise FileExistsError(f"{dst} is not the output of an earlier conversion; --overwrite replaces only those "
                              f"(or an empty directory): remove it yourself or write elsewhere")
    if extra := sorted(entries - (written or set())):
        raise FileExistsError(f"{dst} holds files the converter did not write ({extra}); --overwrite would "
                              f"delete them: move them or write elsewhere")
    return dst


def _written_here(directory: Path) -> set[str] | None:
    """The names atomic_dir wrote into `directory` (its manifest), or None if it did not write it. A converted
    directory from before the manifest is recognised by its config.json format tag."""
    try:
        if (directory / MANIFEST).is_file():
            return set(read_json(directory / MANIFEST)["files"]) | {MANIFEST}
        if read_json(directory / "config.json").get("format") == FORMAT:
            return {"config.json", "model.safetensors", *TOKENIZER_FILES}
    except (OSError, KeyError, TypeError, CheckpointError):
        pass
    return None


def _remove_stale_temporaries(dst: Path) -> None:
    """Remove `.NAME.tmp-PID-*` (and `.NAME.old-PID`, once dst is in place) left by runs whose PID is gone."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(tmp|old)-(\d+)(-[0-9a-f]+)?")
    for path in dst.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and path.is_dir() and not _alive(int(m[2])) and (m[1] == "tmp" or dst.exists()):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    return True


def _move_into_place(tmp: Path, dst: Path) -> None:
    # Signals wait while dst is swapped: between the two renames neither the old nor the new dst is in place.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
        else:
            old = None
            os.replace(tmp, dst)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if old is not None:
        shutil.rmtree(old)


@contextlib.contextmanager
def _signals_raise_interrupted():
    """While the block runs, SIGTERM/SIGHUP/SIGINT raise Interrupted (so the block's cleanup runs); afterwards the
    previous handlers are back and the signal is raised again, so the process ends as it would have (killed by
    it, or KeyboardInterrupt for SIGINT). An ignored signal (nohup's SIGHUP) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a writer in another thread cleans up on exceptions only
        return
    caught = []

    def handler(signum, frame):
        if not caught:  # a second signal must not cut the first one's cleanup short
            caught.append(signum)
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNALS if signal.getsignal(sig) != signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if caught:
            # Killed by the signal under the default handler; if a handler lets the process go on, Interrupted
            # carries on out: the write did not happen.
            signal.raise_signal(caught[0])


def write_project_dir(out: Path, cfg: StableLMConfig, tensors: dict, quantization: dict | None = None) -> None:
    """Write model.safetensors (recording the LAYOUT_FIELDS it was converted with) + config.json into an (already
    temporary) directory."""
    layout = json.dumps({k: getattr(cfg, k) for k in LAYOUT_FIELDS})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", LAYOUT_KEY: layout})
    meta = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "quantization": quantization}
    (out / "config.json").write_text(json.dumps(meta, indent=2))


def copy_tokenizer_files(src: Path, out: Path) -> list[str]:
    src, copied = Path(src).expanduser(), []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, out / name)
            copied.append(name)
    return copied


# ---------------------------------------------------------------- converting directories
def quantization_entry(quant: str | None, group_size: int | None = None, quantize_head: bool = False,
                       quantize_embedding: bool = False) -> dict | None:
    """config.json's quantization entry of a conversion with `quant` ("int8" / "int4" / "nf4", or None), int4's
    `group_size` (default INT4_GROUP_SIZE), `quantize_head` (the lm_head quantized too) and `quantize_embedding`
    (the embedding table too; int8 / int4 only); ValueError for a combination that means nothing."""
    if group_size is not None and quant != "int4":
        raise ValueError(f"group_size applies to int4 quantization only (got quant={quant!r})")
    if quantize_head and quant is None:
        raise ValueError("quantize_head needs a quantization format (quant int8 / int4 / nf4): the head is "
                         "quantized as the other linear layers are")
    if quantize_embedding and quant is None:
        raise ValueError("quantize_embedding needs a quantization format (quant int8 / int4): the table is "
                         "quantized in the linear layers' format")
    if quantize_embedding and quant == "nf4":
        raise ValueError(f"quantize_embedding with quant nf4: {NF4_EMBED_REFUSAL}; use quant int8 or int4")
    if quant is None:
        return None
    if quant == "nf4":
        entry = {"bits": QUANT_BITS[quant], "group_size": NF4_BLOCK_SIZE, "format": "nf4"}
    else:
        bits = QUANT_BITS[quant]
        entry = {"bits": bits, "group_size": INT4_GROUP_SIZE if bits == 4 and group_size is None else group_size}
    if quantize_head:  # only then: an entry without the key is a float head, as in older checkpoints
        entry["lm_head"] = True
    if quantize_embedding:  # likewise: an entry without it is a float table
        entry["embed"] = True
    return entry


def convert_hf_dir(src: str | Path, dst: str | Path, dtype: str | None = None, quant: str | None = None,
                   group_size: int | None = None, overwrite: bool = False, progress: bool = False,
                   quantize_head: bool = False, quantize_embedding: bool = False) -> None:
    """Write the converted form of the Hugging Face checkpoint `src` to `dst`, with its tokenizer files.

    dtype: a DTYPES key (a value that overflows it is an error naming the tensor); quant: "int8" / "int4" / "nf4",
    weight-only, of the linear layers; group_size: int4's (default INT4_GROUP_SIZE), meaningless for int8;
    quantize_head: the causal LM's lm_head too (a tied one: a quantized copy of the embedding table; the
    embedding itself stays float); quantize_embedding: the embedding table too (int8 / int4; an untied
    StableLmForCausalLM only); progress: bars on stderr while reading and converting.
    """
    quantization = quantization_entry(quant, group_size, quantize_head, quantize_embedding)
    src = Path(src).expanduser()
    if quantize_embedding:  # refused from config.json alone, before a weight is read or anything written
        cfg = _config(src / "config.json", StableLMConfig.from_hf)
        if cfg.architecture != "StableLmForCausalLM":
            raise ValueError(f"{src} is a {cfg.architecture}; --quantize-embedding applies to StableLmForCausalLM "
                             f"checkpoints")
        if cfg.tie_word_embeddings:
            raise ValueError(f"{src} has tied embeddings, so its embedding table cannot be quantized "
                             f"(--quantize-embedding): {TIED_EMBED_REFUSAL}")
    with atomic_dir(dst, overwrite, src=src) as out:
        cfg, tensors = read_hf_dir(src, progress)
        if quantize_head and cfg.architecture != "StableLmForCausalLM":
            raise ValueError(f"{src} is a {cfg.architecture}, which has no LM head to quantize (--quantize-head "
                             f"applies to StableLmForCausalLM checkpoints)")
        tensors = _cast(tensors, dtype, progress)
        if quantization is not None:
            tensors = quantize_state_dict(tensors, **quantize_kwargs(quantization))
        write_project_dir(out, cfg, tensors, quantization)
        copy_tokenizer_files(src, out)


def export_hf_dir(src: str | Path, dst: str | Path, dtype: str | None = None, overwrite: bool = False,
                  progress: bool = False) -> None:
    """Write the converted checkpoint `src` back as a transformers checkpoint directory `dst`."""
    src = Path(src).expanduser()
    with atomic_dir(dst, overwrite, src=src) as out:
        cfg, quantization, tensors = read_project_dir(src)
        if quantization:
            # Dequantizing would write rounded weights as if they were the originals, so there is no way back.
            parts = [what for key, what in (("lm_head", "lm_head"), ("embed", "embedding table"))
                     if quantization.get(key)]
            head = f" (its {' and '.join(parts)} too)" if parts else ""
            raise ValueError(f"{src} is quantized{head} ({quantization}); --to-hf needs an unquantized checkpoint: "
                             f"convert the Hugging Face source again without --quant")
        tensors = _cast(project_to_hf(tensors, cfg), dtype, progress)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        copy_tokenizer_files(src, out)


def _cast(tensors: dict, dtype: str | None, progress: bool = False) -> dict:
    """Floating tensors in `dtype`; a finite value that becomes inf (fp16 tops out at 65504) is an error."""
    if dtype is None:
        return tensors
    target, out = DTYPES[dtype], {}
    for name, t in tqdm(tensors.items(), desc=f"converting to {dtype}", unit=" tensors", disable=not progress,
                        file=sys.stderr):
        out[name] = t.to(target) if t.is_floating_point() else t
        if out[name].is_floating_point() and (torch.isinf(out[name]) & torch.isfinite(t)).any():
            raise CheckpointError(f"{name}: values up to {t.abs().max().item():.4g} overflow {dtype} (largest "
                                  f"{torch.finfo(target).max:.4g}); convert to bf16 or fp32 instead")
    return out


# ---------------------------------------------------------------- loading a model
def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         tp: int | None = None, check_finite: bool = True):
    """The model of a converted directory (or, converting in memory, a Hugging Face checkpoint directory), of the
    class its config's `architectures` names: StableLM, StableLMModel, StableLMForSequenceClassification or
    StableLMForTokenClassification (stablelm.model.MODEL_CLASSES).

    dtype: torch dtype or "fp32"/"bf16"/"fp16"; None keeps the stored dtype (quantized tensors keep theirs).
    tp: tensor-parallel degree, the world size of a torchrun launch (stablelm/parallel.py): this rank's shard of
    the model, reading only its slices of the weights; "cuda" then means cuda:LOCAL_RANK.
    check_finite: every floating tensor is checked for NaN / inf as it is read (and again after a dtype cast that
    could overflow); one that holds any is a CheckpointError naming the tensor and the file. False skips it.
    `~` in path is expanded.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory" if not path.exists() else
                                f"{path} is not a directory (expected a checkpoint directory)")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (not a checkpoint directory)")
    if tp is not None:
        if is_hf_dir(path):
            cfg, tensors = read_hf_dir(path, check_finite=check_finite)
            model = parallel.load_sharded(cfg, None, tensors, tp=tp, device=device, dtype=dtype, what=str(path))
        else:
            model = parallel.load_sharded(*read_project_header(path), tp=tp, device=device, dtype=dtype,
                                          what=str(path))
        if check_finite:  # this rank read its slices itself: check them, now on its device
            for name, t in model.state_dict().items():
                check_finite_tensor(name, t, f"{path} (tensor-parallel rank's slice)")
        return model
    if is_hf_dir(path):
        (cfg, tensors), quant = read_hf_dir(path, check_finite=check_finite), None
    else:
        cfg, quant, tensors = read_project_dir(path, check_finite=check_finite)
    try:
        model = skeleton(cfg, quant)
    except ValueError as e:  # a CheckpointError, or quantize_model refusing the entry (a hand-edited tied "embed")
        raise CheckpointError(f"{path}/config.json: {e}") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_tensors(tensors, expected, str(path))
    if dtype is not None:
        narrower = {k for k, v in tensors.items() if v.is_floating_point() and _is_float_param(k, quant)
                    and torch.finfo(dtype).max < torch.finfo(v.dtype).max}
        cast = {k: v.to(dtype) if v.is_floating_point() and _is_float_param(k, quant) else v
                for k, v in tensors.items()}
        if check_finite:  # a finite value past the new dtype's range (fp16 tops out at 65504) became inf
            for k in sorted(narrower):
                if not bool(torch.isfinite(cast[k]).all()):
                    raise CheckpointError(f"{path}: tensor {k} has values up to {tensors[k].abs().max().item():.4g}, "
                                          f"past {dtype}'s largest {torch.finfo(dtype).max:.4g}; load it in "
                                          f"bfloat16 or float32")
        tensors = cast
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, assign=True, strict=True)
    model.rotary = Rotary(cfg).to(device)  # its non-persistent table was built on the meta device
    match_embedding_dtype(model)  # a quantized table's lookups come out in the loaded floats' dtype
    return model.eval()


def skeleton(cfg: StableLMConfig, quant: dict | None = None, dtype: torch.dtype | None = None):
    """The model a converted checkpoint of `cfg` with quantization entry `quant` loads into, on the meta device
    (no memory), its floats in `dtype` (None: float32): its state dict has the names, shapes and dtypes of the
    tensors a conversion to that dtype writes (bench/sizes.py counts their bytes)."""
    model = meta_model(cfg)
    if dtype is not None:
        model.to(dtype)
    if quant:
        quantize_model(model, **quantize_kwargs(quant))
    return model


def _is_float_param(name: str, quant) -> bool:
    # Quantization scales/zeros keep the precision they were stored with.
    return not (quant and name.endswith((".scales", ".zeros", ".absmax_scale", ".absmax_mean")))
