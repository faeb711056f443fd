"""Seeded random corruption of every file the project reads: each corrupted input either loads or raises the
project's own error naming the file (CheckpointError / TokenizerFileError / the vision readers' ValueErrors, all
ValueError subclasses with the path in the message), never another exception type, never a hang (a time limit
per case), and a conversion that fails leaves neither its destination nor a temporary behind.

Files: a converted checkpoint (model.safetensors, config.json, tokenizer.json, tokenizer_config.json) read by
stablelm.load, Tokenizer.from_dir and the --to-hf export; a sharded Hugging Face checkpoint (two safetensors
shards, model.safetensors.index.json, config.json) read by stablelm.load and convert_hf_dir; an annotation.json
read by vision.data.load_annotation; a run checkpoint (state.json, model.safetensors, optimizer.safetensors) read
by vision.pipeline.load_run_checkpoint.

Corruptions: truncation (anywhere, and inside a safetensors header), bit flips in a safetensors header and in
its body, random bytes over a span, a huge or a too-large header length, wrong JSON types and missing keys (in
JSON files and in safetensors headers, rewritten with a consistent length), non-UTF-8 bytes, deep nesting,
an empty file, trailing garbage.

CASES cases in all (200; the README quotes it), SEED fixed: the same cases run in CI every time
(STABLELM_FUZZ_CASES=5000 tries more locally).
"""
import json
import os
import random
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import stablelm
from hf_utils import hf_model
from stablelm.checkpoint import convert_hf_dir, export_hf_dir
from stablelm.cli import checkpoint_info
from stablelm.tokenizer import Tokenizer

CASES = int(os.environ.get("STABLELM_FUZZ_CASES", 200))  # corrupted inputs per run, over all targets
SEED = int(os.environ.get("STABLELM_FUZZ_SEED", 20240610))
CASE_SECONDS = 10  # one case taking longer counts as a hang

CORPUS = ["no acute cardiopulmonary process", "the heart size is normal", "lungs are clear"] * 10
ODD_VALUES = [None, True, False, 0, -1, 2 ** 63, 10 ** 30, 1.5, float("nan"), "", "x" * 3, "\u00e9", [], [1, "a"],
              {}, {"a": None}]


# ---------------------------------------------------------------- the pristine inputs
def _tokenizer_files(directory: Path) -> None:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>", "special": True},
         "additional_special_tokens": [], "clean_up_tokenization_spaces": False,
         "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}))


def _sharded_hf(directory: Path) -> None:
    """A transformers checkpoint in two safetensors shards with an index."""
    model = hf_model(vocab_size=280, num_hidden_layers=2)
    model.config.save_pretrained(directory)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(directory / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
             "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _tokenizer_files(directory)


def _run_checkpoint(directory: Path, work: Path) -> None:
    from stablelm.lora import make_optimizer
    from vision.pipeline import build_model, build_tokenizer, save_run_checkpoint
    from vision.report_model import ReportConfig
    tok_dir = build_tokenizer(CORPUS, work / "run_tokenizer", 300)
    spec = {"lm": None, "lm_preset": "tiny", "encoder": None, "encoder_preset": "tiny", "tokenizer": str(tok_dir),
            "seed": 0, "report": ReportConfig(max_length=20).to_dict(), "dataset": "iu_xray", "precision": "fp32"}
    torch.manual_seed(0)
    model = build_model(spec, "cpu", "fp32")
    opt, sched = make_optimizer(model, 1e-3, 0.0, 10)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    save_run_checkpoint(directory, model, spec, epoch=0, step=1, optimizer=opt, scheduler=sched)


def _annotation(directory: Path) -> None:
    directory.mkdir(parents=True)
    entries = {split: [{"id": f"{split}{i}", "report": CORPUS[i], "image_path": [f"{split}{i}/0.png"],
                        "split": split} for i in range(2)] for split in ("train", "val", "test")}
    (directory / "annotation.json").write_text(json.dumps(entries))


# ---------------------------------------------------------------- readers: what a user runs on each input
def _read_converted(d: Path, out: Path) -> None:
    checkpoint_info(d)
    stablelm.load(d)
    Tokenizer.from_dir(d)
    export_hf_dir(d, out)


def _read_hf(d: Path, out: Path) -> None:
    checkpoint_info(d)
    Tokenizer.from_dir(d)
    stablelm.load(d)
    convert_hf_dir(d, out)


def _read_annotation(d: Path, out: Path) -> None:
    from vision.data import load_annotation
    load_annotation(d / "annotation.json")


def _read_run(d: Path, out: Path) -> None:
    from vision.pipeline import load_run_checkpoint
    load_run_checkpoint(d)


TARGETS = {  # name: (files to corrupt, reader)
    "converted": (["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"], _read_converted),
    "hf_sharded": (["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                    "model.safetensors.index.json", "config.json", "tokenizer.json"], _read_hf),
    "annotation": (["annotation.json"], _read_annotation),
    "run": (["state.json", "model.safetensors", "optimizer.safetensors"], _read_run),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_pristine")
    hf = root / "hf_sharded"
    hf.mkdir()
    _sharded_hf(hf)
    convert_hf_dir(hf, root / "converted")
    _annotation(root / "annotation")
    _run_checkpoint(root / "run", root)
    for name, (files, reader) in TARGETS.items():  # every pristine input reads cleanly
        for f in files:
            assert (root / name / f).is_file(), (name, f)
        reader(root / name, root / f"{name}_out")
    return root


# ---------------------------------------------------------------- corruptions
def _safetensors_parts(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return n, data[8:8 + n], data[8 + n:]


def _json_paths(value, prefix=()):
    """Every (path to a value) in a JSON document, the root excluded."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield prefix + (k,)
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):
            yield prefix + (i,)
            yield from _json_paths(v, prefix + (i,))


def _mutate_json(value, rng: random.Random, kind: str):
    paths = list(_json_paths(value))
    if not paths:
        return rng.choice(ODD_VALUES)
    path = rng.choice(paths)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if kind == "missing":
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(ODD_VALUES)
    return value


def corrupt(data: bytes, name: str, rng: random.Random) -> tuple[str, bytes]:
    """(description, corrupted bytes) of one file."""
    is_st = name.endswith(".safetensors")
    kinds = ["truncate", "flip_body", "random_span", "empty", "trailing_garbage", "non_utf8"]
    kinds += ["truncate_header", "flip_header", "huge_header_len", "header_len_past_end", "header_wrong_type",
              "header_missing_key"] if is_st else ["wrong_type", "missing_key", "deep_nesting", "wrong_type"]
    kind = rng.choice(kinds)
    b = bytearray(data)
    if kind == "truncate":
        return kind, bytes(b[:rng.randrange(len(b))])
    if kind == "empty":
        return kind, b""
    if kind == "trailing_garbage":
        return kind, bytes(b) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == "random_span":
        at = rng.randrange(len(b))
        for i in range(at, min(len(b), at + rng.randint(1, 16))):
            b[i] = rng.randrange(256)
        return kind, bytes(b)
    if kind == "flip_body":
        start = 8 + _safetensors_parts(data)[0] if is_st else 0
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(start, len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "non_utf8":
        start, end = (8, 8 + _safetensors_parts(data)[0]) if is_st else (0, len(b))
        b[rng.randrange(start, end)] = rng.choice([0xff, 0xc3, 0x80, 0xfe])
        return kind, bytes(b)
    if kind == "truncate_header":
        return kind, bytes(b[:rng.randrange(8 + _safetensors_parts(data)[0])])
    if kind == "flip_header":
        n = _safetensors_parts(data)[0]
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(8 + n)] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "huge_header_len":
        return kind, struct.pack("<Q", rng.choice([2 ** 63, 2 ** 40, 2 ** 64 - 1])) + bytes(b[8:])
    if kind == "header_len_past_end":
        return kind, struct.pack("<Q", len(b) + rng.randint(1, 100)) + bytes(b[8:])
    if kind in ("header_wrong_type", "header_missing_key"):
        _, header, body = _safetensors_parts(data)
        new = json.dumps(_mutate_json(json.loads(header), rng, kind.split("_", 1)[1].split("_")[0])).encode()
        return kind, struct.pack("<Q", len(new)) + new + body
    if kind in ("wrong_type", "missing_key"):
        try:
            value = json.loads(data)
        except ValueError:  # not JSON: fall back to bytes
            return corrupt(data, name, rng)
        return kind, json.dumps(_mutate_json(value, rng, kind.split("_")[0])).encode()
    if kind == "deep_nesting":
        depth = rng.choice([2000, 100_000])
        return kind, ("[" * depth + "]" * depth).encode()
    raise AssertionError(kind)


class CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def _case_plan():
    rng = random.Random(SEED)
    pairs = [(target, f) for target, (files, _) in TARGETS.items() for f in files]
    return [(pairs[i % len(pairs)], rng.getrandbits(32)) for i in range(CASES)]


def test_every_corrupted_file_loads_or_is_a_clear_error(pristine, tmp_path):
    previous = signal.signal(signal.SIGALRM, _alarm)
    outcomes = {"loaded": 0, "refused": 0}
    failures = []
    try:
        for case, ((target, name), seed) in enumerate(_case_plan()):
            rng = random.Random(seed)
            work = tmp_path / f"case{case}"
            d = work / target
            shutil.copytree(pristine / target, d)
            kind, data = corrupt((d / name).read_bytes(), name, rng)
            (d / name).write_bytes(data)
            out = work / "out"
            where = f"case {case}: {target}/{name} {kind}"
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                TARGETS[target][1](d, out)
                outcomes["loaded"] += 1
            except CaseTimeout:
                failures.append(f"{where}: no result after {CASE_SECONDS} s")
            except ValueError as e:  # CheckpointError, TokenizerFileError, the vision readers' errors
                outcomes["refused"] += 1
                if name not in str(e) and str(d) not in str(e):
                    failures.append(f"{where}: {type(e).__name__} does not name the file: {e}")
            except Exception as e:
                failures.append(f"{where}: {type(e).__name__}: {str(e)[:300]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            # Never a partial write: a failed conversion leaves no destination and no temporary.
            leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith((".out.", ".out")))
            if leftovers or (out.exists() and not (out / "config.json").is_file()):
                failures.append(f"{where}: partial write left {leftovers or [out.name]}")
            shutil.rmtree(work, ignore_errors=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures)
    assert outcomes["refused"] > CASES // 4  # the corruptions did reach the readers' checks
