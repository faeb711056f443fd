"""Checkpoints with the lm_head quantized (`convert --quant int8|int4|nf4 --quantize-head`): what the converter
writes and records, stablelm.load rebuilding the head strictly (tied and untied), the head's accuracy bound against
the float model, the usage errors and refusals, and bench/sizes.py's bytes against real converted checkpoints."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stablelm.checkpoint as ckpt
from bench import sizes
from hf_utils import save_random_hf_checkpoint
from stablelm import ops
from stablelm.cli import main as cli_main
from stablelm.config import PRESETS
from stablelm.convert import CheckpointError
from stablelm.quantize import NF4Linear, QuantLinear, quantize_kwargs, quantize_model

ROOT = Path(__file__).resolve().parents[1]
# --quant and its --group-size: the random checkpoint's K are 64 (hidden) and 192 (intermediate), so int4 runs at
# group 32 (as tests/test_quant.py's model bounds) and NF4 at the converter's block 64.
FORMATS = {"int8": [], "int4": ["--group-size", "32"], "nf4": []}
HEAD_CLASS = {"int8": QuantLinear, "int4": QuantLinear, "nf4": NF4Linear}
# Converted vs float model, ||logits_q - logits|| / ||logits|| on 2 x 24 tokens of the random checkpoint
# (hf_utils.save_random_hf_checkpoint, hidden 64, intermediate 192, vocab 96), measured over 3 seeds, tied or not:
#   head float      int8 0.0010-0.0013, top-1 agreement 0.96-1.0; int4 g32 0.015-0.024, 0.96-1.0; nf4 0.015-0.028
#   head quantized  int8 0.0057-0.0064, agreement 0.98-1.0;       int4 g32 0.080-0.086, 0.83-0.94; nf4 0.091-0.103,
#                   0.77-0.96
# Here the head is most of the error: its K (hidden 64) is the smallest, and its outputs are the logits themselves.
HEAD_REL_ERR = {"int8": 1e-2, "int4": 1.2e-1, "nf4": 1.4e-1}
HEAD_AGREEMENT = {"int8": 0.9, "int4": 0.6, "nf4": 0.6}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{(tied, quant, quantize_head): converted dir} and {tied: Hugging Face source dir}."""
    tmp = tmp_path_factory.mktemp("quant_head")
    torch.manual_seed(0)
    sources = {tied: save_random_hf_checkpoint(tmp / f"hf-tied{tied}", intermediate_size=192,
                                               tie_word_embeddings=tied) for tied in (False, True)}
    dirs = {}
    for tied, src in sources.items():
        for quant, group in FORMATS.items():
            for head in (False, True):
                dst = tmp / f"{quant}-tied{tied}-head{head}"
                assert cli_main(["convert", str(src), str(dst), "--quant", quant, *group,
                                 *(["--quantize-head"] if head else [])]) == 0
                dirs[tied, quant, head] = dst
    return dirs, sources


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quant", list(FORMATS))
def test_quantized_head_converts_records_and_loads(converted, quant, tied):
    dirs, sources = converted
    dst = dirs[tied, quant, True]
    entry = json.loads((dst / "config.json").read_text())["quantization"]
    assert entry["lm_head"] is True
    assert "lm_head" not in json.loads((dirs[tied, quant, False] / "config.json").read_text())["quantization"]
    stored = load_file(str(dst / "model.safetensors"))
    assert "lm_head.qweight" in stored and "lm_head.weight" not in stored
    model = ckpt.load(dst)  # strict: every stored tensor has its place, and every place its tensor
    assert type(model.lm_head) is HEAD_CLASS[quant]
    assert sorted(model.state_dict()) == sorted(stored)
    float_model = ckpt.load(sources[tied])
    # The tied head is a quantized copy of the table; the lookups still read the float table.
    assert model.embed.weight.dtype == torch.float32 and torch.equal(model.embed.weight, float_model.embed.weight)
    # The same model as quantizing the float one in memory, bit for bit.
    reference = quantize_model(float_model, **quantize_kwargs(entry))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad(), ops.using(quant_linear="torch", nf4_linear="torch"):
        assert torch.equal(model(ids), reference(ids))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quant", list(FORMATS))
def test_quantized_head_logits_within_bound(converted, quant, tied):
    dirs, sources = converted
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ops.using(quant_linear="triton", nf4_linear="triton"):
        want = ckpt.load(sources[tied])(ids)
        rel = {}
        for head in (False, True):
            got = ckpt.load(dirs[tied, quant, head])(ids)
            rel[head] = ((got - want).norm() / want.norm()).item()
    assert rel[True] < HEAD_REL_ERR[quant], rel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= HEAD_AGREEMENT[quant]
    assert rel[True] > rel[False], rel  # the head really is quantized: the bound is not the float head's


def test_quantize_head_without_quant_is_a_usage_error(converted, tmp_path):
    src = converted[1][False]
    for script in (["-m", "stablelm", "convert"], ["convert_weights.py"]):
        r = subprocess.run([sys.executable, *script, str(src), str(tmp_path / "out"), "--quantize-head"], cwd=ROOT,
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "error: --quantize-head needs --quant" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="quantize_head needs a quantization format"):
        ckpt.convert_hf_dir(src, tmp_path / "out", quantize_head=True)


def test_quantize_head_refusals(converted, tmp_path):
    dirs, _ = converted
    classifier = save_random_hf_checkpoint(tmp_path / "cls", architectures=["StableLmForSequenceClassification"],
                                           num_labels=3)
    with pytest.raises(ValueError, match="StableLmForSequenceClassification, which has no LM head"):
        ckpt.convert_hf_dir(classifier, tmp_path / "cls-int8", quant="int8", quantize_head=True)
    assert not (tmp_path / "cls-int8").exists()
    with pytest.raises(ValueError, match=r"is quantized \(its lm_head too\).*--to-hf needs an unquantized"):
        ckpt.export_hf_dir(dirs[True, "int8", True], tmp_path / "back")
    # A hand-edited entry is refused on load, not read as a float head.
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("config.json", "model.safetensors"):
        (edited / name).write_bytes((dirs[False, "int8", True] / name).read_bytes())
    meta = json.loads((edited / "config.json").read_text())
    meta["quantization"]["lm_head"] = "yes"
    (edited / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=re.escape('[, "lm_head": true | false][, "embed": true | false]}')):
        ckpt.load(edited)


def _check_rows_against_conversions(rows, src, tmp_path):
    """Every computable row's bytes equal the tensors of a real `convert --dtype bf16` checkpoint and a loaded
    model's state dict; a row that cannot be computed names why."""
    for i, row in enumerate(rows):
        entry = row["quantization"]
        if "error" in row:
            assert "does not divide" in row["error"], row
            continue
        quant = None if entry is None else "nf4" if entry.get("format") == "nf4" else f"int{entry['bits']}"
        dst = tmp_path / f"row{i}"
        ckpt.convert_hf_dir(src, dst, "bf16", quant, entry["group_size"] if quant == "int4" else None,
                            quantize_head=row["lm_head"] == "quantized", quantize_embedding=row["embed"] == "quantized")
        stored = load_file(str(dst / "model.safetensors"))
        assert row["bytes"] == tensor_bytes(stored) == tensor_bytes(ckpt.load(dst).state_dict()), row
        for part in ("lm_head", "embed"):
            assert row["parts_bytes"][part] == tensor_bytes({k: v for k, v in stored.items()
                                                             if k.startswith(f"{part}.")}), row


def test_sizes_script_matches_converted_checkpoints(converted, tmp_path):
    """`python -m bench.sizes --preset tiny` in a subprocess (int4 at group 32: the tiny preset's intermediate
    size 352 takes neither group 128 nor NF4's block 64), and --model on a checkpoint every format fits."""
    out = tmp_path / "sizes.json"
    r = subprocess.run([sys.executable, "-m", "bench.sizes", "--preset", "tiny", "--group-size", "32", "--out",
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "| int4 g32 | quantized | bf16 |" in r.stdout and "| int4 g32 | quantized | quantized |" in r.stdout
    payload = json.loads(out.read_text())
    assert payload["environment"]["date"] and payload["environment"]["torch"]
    assert [("error" in row) for row in payload["rows"]] == [False] * 7 + [True] * 2  # nf4: K=352
    torch.manual_seed(1)
    tiny = save_random_hf_checkpoint(tmp_path / "tiny-hf", **PRESETS["tiny"])
    _check_rows_against_conversions(payload["rows"], tiny, tmp_path / "tiny")

    src = converted[1][False]
    sizes.main(["--model", str(src), "--group-size", "32", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert not [row["error"] for row in rows if "error" in row]
    _check_rows_against_conversions(rows, src, tmp_path / "model")
