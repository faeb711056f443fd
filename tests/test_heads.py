"""The backbone and the classification heads against transformers' StableLmModel / StableLmForSequenceClassification
/ StableLmForTokenClassification (fp32, random weights, left and right padding, every loss), their conversion both
ways, LoRA merging, and fine-tuning a head (API and the `python -m stablelm.classify` CLI) on a separable task."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (StableLmConfig, StableLmForCausalLM, StableLmForSequenceClassification,
                          StableLmForTokenClassification, StableLmModel)

import convert_weights
import stablelm
from stablelm import classify
from stablelm.config import StableLMConfig
from stablelm.convert import CheckpointError, read_hf_tensors
from stablelm.lora import LM_TARGETS, apply_lora, merge_lora
from stablelm.model import (StableLM, StableLMForSequenceClassification as OurSeq,
                            StableLMForTokenClassification as OurTok, StableLMModel as OurModel)

ROOT = Path(__file__).resolve().parents[1]
PAD = 0
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
VARIANTS = {
    "default": {},
    "gqa_qkln_parallel": dict(num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True, use_qkv_bias=True),
}
HF_CLASSES = {"StableLmModel": StableLmModel, "StableLmForCausalLM": StableLmForCausalLM,
              "StableLmForSequenceClassification": StableLmForSequenceClassification,
              "StableLmForTokenClassification": StableLmForTokenClassification}
OURS = {"StableLmModel": OurModel, "StableLmForCausalLM": StableLM, "StableLmForSequenceClassification": OurSeq,
        "StableLmForTokenClassification": OurTok}
TOL = 1e-4


def hf_model(arch, seed=0, **overrides):
    """A transformers StableLM `arch` (eager attention, fp32, eval): random weights, LayerNorms perturbed."""
    torch.manual_seed(seed)
    model = HF_CLASSES[arch](StableLmConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.08)
    model.config._attn_implementation = "eager"
    return model


def ours_of(hf, tmp_path):
    """Ours, converted from the saved transformers checkpoint by convert_weights.py and loaded back."""
    src, dst = tmp_path / "hf", tmp_path / "converted"
    hf.save_pretrained(src)
    convert_weights.main([str(src), str(dst)])
    return stablelm.load(dst)


def padded(batch_pads, length, side, vocab=BASE["vocab_size"]):
    """ids [B, length] with row i padded by batch_pads[i] pad tokens on `side` (real tokens never PAD), mask,
    and the positions transformers needs to count from each row's first real token."""
    ids = torch.randint(3, vocab, (len(batch_pads), length))
    mask = torch.ones_like(ids)
    for row, n in enumerate(batch_pads):
        if n:
            mask[row, :n] = 0 if side == "left" else 1
            if side == "right":
                mask[row, -n:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


PADDINGS = {"left": (5, 0, 9), "right": (0, 7, 3), "none": (0, 0)}


def batch(side):
    return padded(PADDINGS[side], 16, "left" if side == "none" else side)


# ---------------------------------------------------------------- backbone
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_backbone_hidden_states_match_transformers(variant, side, tmp_path):
    hf = hf_model("StableLmModel", **VARIANTS[variant])
    model = ours_of(hf, tmp_path)
    assert type(model) is OurModel and model.config.architectures == ["StableLmModel"]
    ids, mask, positions = batch(side)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        plain = model(ids, attention_mask=mask)
    real = mask.bool()
    assert torch.equal(plain, out.last_hidden_state)
    assert plain.shape == (3, 16, BASE["hidden_size"])
    assert (out.last_hidden_state[real] - ref.last_hidden_state[real]).abs().max() < TOL
    # transformers: the embeddings, each layer's output, the last replaced by the final LayerNorm's output.
    assert len(out.hidden_states) == len(ref.hidden_states) == BASE["num_hidden_layers"] + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert (ours[real] - theirs[real]).abs().max() < TOL
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_backbone_default_positions_reproduce_transformers_arange(tmp_path):
    """transformers' StableLmModel counts positions 0..S-1 whatever the mask; positions= reproduces it."""
    hf = hf_model("StableLmModel", **VARIANTS["gqa_qkln_parallel"])
    model = ours_of(hf, tmp_path)
    ids, mask, _ = batch("left")
    arange = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).last_hidden_state
        out = model(ids, attention_mask=mask, positions=arange)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() < TOL


@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_is_the_backbone_plus_lm_head(tied, tmp_path):
    hf = hf_model("StableLmForCausalLM", tie_word_embeddings=tied, **VARIANTS["gqa_qkln_parallel"])
    model = ours_of(hf, tmp_path)
    assert type(model) is StableLM and isinstance(model, OurModel)
    assert ("lm_head.weight" in model.state_dict()) is not tied
    ids, mask, positions = batch("left")
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        logits = model(ids, attention_mask=mask)
        hidden = OurModel.forward(model, ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    assert (logits[real] - ref.logits[real]).abs().max() < TOL
    for ours, theirs in zip(hidden.hidden_states, ref.hidden_states):
        assert (ours[real] - theirs[real]).abs().max() < TOL


def test_backbone_argument_errors():
    model = OurModel.random(stablelm.preset("tiny"))
    with pytest.raises(ValueError, match="last_only"):
        model(torch.zeros(1, 3, dtype=torch.long), last_only=True, output_hidden_states=True)


# ---------------------------------------------------------------- sequence classification
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_classification_matches_transformers(variant, side, tmp_path):
    hf = hf_model("StableLmForSequenceClassification", num_labels=3, **VARIANTS[variant])
    model = ours_of(hf, tmp_path)
    assert type(model) is OurSeq and model.config.num_labels == 3 and model.config.pad_token_id == PAD
    ids, mask, positions = batch(side)
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, labels=labels, output_hidden_states=True)
        out = model(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert out.logits.shape == (3, 3)
    assert (out.logits - ref.logits).abs().max() < TOL
    assert abs(out.loss.item() - ref.loss.item()) < TOL
    real = mask.bool()
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert (ours[real] - theirs[real]).abs().max() < TOL


def test_sequence_classification_pooling_rule(tmp_path):
    """The rightmost token != pad_token_id, as transformers: a pad id inside the text, a row of only padding."""
    hf = hf_model("StableLmForSequenceClassification", num_labels=2)
    model = ours_of(hf, tmp_path)
    ids = torch.tensor([[5, PAD, 7, PAD, PAD], [PAD] * 5, [4, 4, 4, 4, 9]])
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids).logits
    assert (out - ref).abs().max() < TOL
    # No pad id: a batch is an error, a single row pools its last position (input_embeds likewise, warned).
    model.config.pad_token_id = hf.config.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id"):
        model(ids)
    with torch.no_grad():
        assert (model(ids[:1]).logits - hf(ids[:1]).logits).abs().max() < TOL
    model.config.pad_token_id = PAD
    with pytest.warns(UserWarning, match="input_embeds"), torch.no_grad():
        emb = model.embed(ids[2:])
        assert (model(input_embeds=emb).logits - model(ids[2:]).logits).abs().max() < TOL


LOSS_CASES = {
    "regression_1": (1, None, lambda B: torch.randn(B)),
    "regression_3": (3, "regression", lambda B: torch.randn(B, 3)),
    "single_label": (3, None, lambda B: torch.tensor([2, 0, 1])[:B]),
    "single_label_explicit": (3, "single_label_classification", lambda B: torch.tensor([1, 1, 0])[:B]),
    "multi_label": (3, None, lambda B: torch.randint(0, 2, (B, 3)).float()),
    "multi_label_explicit": (4, "multi_label_classification", lambda B: torch.randint(0, 2, (B, 4)).float()),
}


@pytest.mark.parametrize("case", LOSS_CASES)
def test_sequence_classification_losses(case, tmp_path):
    num_labels, problem_type, make = LOSS_CASES[case]
    hf = hf_model("StableLmForSequenceClassification", num_labels=num_labels, problem_type=problem_type)
    model = ours_of(hf, tmp_path)
    assert model.config.problem_type == problem_type
    ids, mask, positions = batch("right")
    labels = make(3)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, labels=labels)
        out = model(ids, attention_mask=mask, labels=labels)
    assert (out.logits - ref.logits).abs().max() < TOL
    assert abs(out.loss.item() - ref.loss.item()) < TOL
    # An unset problem_type is inferred on the first loss and kept, in both.
    assert model.config.problem_type == hf.config.problem_type


# ---------------------------------------------------------------- token classification
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_token_classification_matches_transformers(variant, side, tmp_path):
    hf = hf_model("StableLmForTokenClassification", num_labels=5, **VARIANTS[variant])
    model = ours_of(hf, tmp_path)
    assert type(model) is OurTok and isinstance(model.dropout, torch.nn.Dropout)
    ids, mask, positions = batch(side)
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    labels[0, -1] = -100  # an ignored real token too
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, labels=labels)
        out = model(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert out.logits.shape == (3, 16, 5)
    assert (out.logits[real] - ref.logits[real]).abs().max() < TOL
    assert abs(out.loss.item() - ref.loss.item()) < TOL


@pytest.mark.parametrize("hf_fields,p", [({}, 0.0), ({"classifier_dropout": 0.25}, 0.25)])
def test_token_classification_dropout_rule(hf_fields, p, tmp_path):
    """classifier_dropout, else hidden_dropout (0 for every config this project runs), as transformers picks."""
    hf = hf_model("StableLmForTokenClassification", **hf_fields)
    assert hf.dropout.p == p
    assert ours_of(hf, tmp_path).dropout.p == p


# ---------------------------------------------------------------- conversion
@pytest.mark.parametrize("arch", list(HF_CLASSES))
def test_conversion_round_trip_is_exact(arch, tmp_path):
    fields = dict(num_labels=4, id2label={0: "none", 1: "mild", 2: "severe", 3: "critical"},
                  problem_type="single_label_classification") if "Classification" in arch else {}
    hf = hf_model(arch, **fields, **VARIANTS["gqa_qkln_parallel"])
    src, dst, back = tmp_path / "hf", tmp_path / "converted", tmp_path / "back"
    hf.save_pretrained(src)
    convert_weights.main([str(src), str(dst)])
    meta = json.loads((dst / "config.json").read_text())
    assert meta["config"]["architectures"] == [arch]
    assert type(stablelm.load(dst)) is OURS[arch]
    convert_weights.main([str(dst), str(back), "--to-hf"])
    original, again = read_hf_tensors(src), read_hf_tensors(back)
    assert sorted(original) == sorted(again)
    assert all(torch.equal(original[k], again[k]) for k in original)
    # transformers reads the exported directory as the same class with the same labels.
    reloaded = HF_CLASSES[arch].from_pretrained(back).eval()
    assert reloaded.config.architectures == [arch]
    if "Classification" in arch:
        assert reloaded.config.id2label == hf.config.id2label and reloaded.config.num_labels == 4
        assert reloaded.config.problem_type == "single_label_classification"
    assert StableLMConfig.from_hf(json.loads((back / "config.json").read_text())) == stablelm.load(dst).config


@pytest.mark.parametrize("saved,claimed,names", [
    ("StableLmForSequenceClassification", "StableLmForCausalLM", ["lm_head.weight", "score.weight"]),
    ("StableLmForCausalLM", "StableLmForTokenClassification", ["lm_head.weight", "score.bias", "score.weight"]),
    ("StableLmForTokenClassification", "StableLmForSequenceClassification", ["score.bias"]),
])
def test_class_mismatch_is_an_error_naming_the_tensors(saved, claimed, names, tmp_path):
    src = tmp_path / "hf"
    hf_model(saved).save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": [claimed]}))
    with pytest.raises(CheckpointError) as err:
        convert_weights.main([str(src), str(tmp_path / "out")])
    for name in names:
        assert name in str(err.value)
    assert "architectures" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_config_head_fields_round_trip():
    hf = StableLmConfig(**BASE, id2label={0: "a", 1: "b", 2: "c"}, problem_type="multi_label_classification",
                        classifier_dropout=0.1, architectures=["StableLmForTokenClassification"]).to_dict()
    cfg = StableLMConfig.from_hf(hf)
    assert (cfg.num_labels, cfg.id2label, cfg.problem_type, cfg.classifier_dropout, cfg.pad_token_id,
            cfg.architectures) == (3, {0: "a", 1: "b", 2: "c"}, "multi_label_classification", 0.1, PAD,
                                   ["StableLmForTokenClassification"])
    assert StableLMConfig.from_hf(StableLmConfig(**cfg.to_hf()).to_dict()) == cfg
    assert StableLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # transformers' defaults: 2 labels named LABEL_i, kept as None so an LM config compares equal.
    plain = StableLMConfig.from_hf(StableLmConfig(**BASE).to_dict())
    assert plain.id2label is None and plain.num_labels == 2 and plain.architectures == ["StableLmForCausalLM"]
    for bad, field in [({"architectures": ["StableLmForQuestionAnswering"]}, "architectures"),
                       ({"problem_type": "ranking"}, "problem_type"),
                       ({"num_labels": 1, "problem_type": "single_label_classification"}, "problem_type"),
                       ({"num_labels": 3, "id2label": {0: "a"}}, "id2label")]:
        with pytest.raises(ValueError, match=field):
            StableLMConfig(**bad)


def test_from_backbone_shares_the_decoder():
    lm = StableLM.random(stablelm.preset("tiny"))
    clf = OurSeq.from_backbone(lm, num_labels=3, pad_token_id=0)
    assert clf.config.architectures == ["StableLmForSequenceClassification"]
    assert clf.layers[0].attn.qkv.weight.data_ptr() == lm.layers[0].attn.qkv.weight.data_ptr()
    ids = torch.randint(1, 512, (2, 7))
    with torch.no_grad():
        assert torch.equal(OurModel.forward(clf, ids), OurModel.forward(lm, ids))
    assert set(clf.state_dict()) == set(lm.state_dict()) - {"lm_head.weight"} | {"score.weight"}


# ---------------------------------------------------------------- LoRA
def test_lora_merge_keeps_outputs():
    model = OurTok.random(stablelm.preset("tiny", num_labels=3))
    apply_lora(model, {**LM_TARGETS, "attn.qkv": [(0, 128), (256, 384)]}, r=4, alpha=8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        ids = torch.randint(0, 512, (2, 9))
        before = model(ids).logits
        assert len(merge_lora(model)) == 4 * 2
        assert not any("lora" in n for n in model.state_dict())
        assert (model(ids).logits - before).abs().max() < 1e-5


# ---------------------------------------------------------------- fine-tuning
WORDS = [f"w{i}" for i in range(40)]


def tokenizer_dir(path: Path) -> Path:
    """A word-level tokenizer over WORDS (+ <pad>, <eos>) written as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>",
                                                            "unk_token": "<unk>"}))
    return path


def separable(n: int, seed: int) -> list[tuple[str, str]]:
    """Texts of 3-10 words: 'urgent' ones draw from the first half of WORDS, 'routine' ones from the second."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = ("urgent", "routine")[i % 2]
        lo = 0 if label == "urgent" else 20
        k = int(torch.randint(3, 11, (1,), generator=g))
        out.append((" ".join(WORDS[lo + int(j)] for j in torch.randint(0, 20, (k,), generator=g)), label))
    return out


def tiny_lm_dir(path: Path) -> Path:
    """A random-weight causal LM (converted format) with the word-level tokenizer beside it."""
    from stablelm import checkpoint

    cfg = stablelm.preset("tiny", vocab_size=48, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                          num_key_value_heads=4, num_hidden_layers=2)
    lm = StableLM.random(cfg, seed=1, std=0.08)
    with checkpoint.atomic_dir(path) as tmp:
        checkpoint.write_project_dir(tmp, cfg, lm.state_dict())
        tokenizer_dir(tmp)
    return path


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fine_tune_raises_accuracy(mode, tmp_path):
    lm_dir = tiny_lm_dir(tmp_path / "lm")
    train, held_out = separable(64, seed=0), separable(32, seed=1)
    model, tok = classify.build(lm_dir, classify.label_names(train))
    assert model.config.labels()[0] == {0: "routine", 1: "urgent"} and model.config.pad_token_id == 0
    trainable = classify.set_trainable(model, mode, r=8, alpha=16.0, dropout=0.0)
    assert "score.weight" in trainable
    if mode == "lora":
        assert all("lora_" in n or n == "score.weight" for n in trainable)
    else:
        assert len(trainable) == len(list(model.parameters()))
    before = classify.evaluate(model, tok, held_out)
    lines = []
    history = classify.fit(model, tok, train, held_out, epochs=4, batch_size=8, lr=3e-3, log=lines.append)
    after = classify.evaluate(model, tok, held_out)
    assert len(history) == len(lines) == 4 and "accuracy" in lines[-1] and "macro_f1" in lines[-1]
    assert after["accuracy"] >= 0.9 and after["accuracy"] > before["accuracy"] + 0.2, (before, after)
    assert after["macro_f1"] >= 0.9
    # Saved (adapters merged) and loaded back as the classifier, predicting the same.
    classify.save(model, tmp_path / "clf", lm_dir)
    again, _ = classify.build(tmp_path / "clf")
    assert type(again) is OurSeq and again.config.labels()[0] == model.config.labels()[0]
    assert classify.evaluate(again, tok, held_out)["accuracy"] == after["accuracy"]
    assert not list((tmp_path / "clf").glob("*.pt")) and not list((tmp_path / "clf").glob("*.bin"))


def test_scores():
    assert classify.scores([0, 0, 1, 1], [0, 0, 1, 1]) == {"accuracy": 1.0, "macro_f1": 1.0}
    s = classify.scores([0, 0, 1, 2], [0, 1, 1, 1])
    assert s["accuracy"] == 0.5 and abs(s["macro_f1"] - (2 / 3 + 2 / 4 + 0) / 3) < 1e-12


def test_read_examples_csv_jsonl_and_errors(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"w1, w2",yes\nw3,no\n')
    assert classify.read_examples(tmp_path / "a.csv") == [("w1, w2", "yes"), ("w3", "no")]
    (tmp_path / "a.jsonl").write_text('{"text": "w1", "label": 1}\n\n{"text": "w2", "label": 0}\n')
    rows = classify.read_examples(tmp_path / "a.jsonl")
    assert rows == [("w1", "1"), ("w2", "0")] and classify.label_names(rows) == {0: "0", 1: "1"}
    (tmp_path / "b.jsonl").write_text('{"text": "w1"}\n')
    with pytest.raises(ValueError, match="b.jsonl:1"):
        classify.read_examples(tmp_path / "b.jsonl")
    with pytest.raises(ValueError, match="'label' column"):
        (tmp_path / "b.csv").write_text("text,y\nw1,1\n")
        classify.read_examples(tmp_path / "b.csv")


def test_cli_trains_and_evaluates(tmp_path):
    lm_dir = tiny_lm_dir(tmp_path / "lm")
    for name, rows in (("train.jsonl", separable(32, 0)), ("val.jsonl", separable(16, 1))):
        (tmp_path / name).write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    cmd = [sys.executable, "-m", "stablelm.classify", "train", "--model", str(lm_dir),
           "--data", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "val.jsonl"), "--lora-r", "4",
           "--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--out", str(tmp_path / "clf"), "--device", "cpu"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    epoch_lines = [l for l in run.stdout.splitlines() if l.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("accuracy" in l and "macro_f1" in l for l in epoch_lines)
    assert "epoch 2/2" in run.stderr  # the tqdm bar
    metrics = json.loads((tmp_path / "clf" / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert type(stablelm.load(tmp_path / "clf")) is OurSeq
    result = classify.main(["evaluate", "--model", str(tmp_path / "clf"), "--data", str(tmp_path / "val.jsonl"),
                            "--device", "cpu"])
    assert result["accuracy"] == metrics["history"][-1]["accuracy"]


def test_quantized_classifier_loads(tmp_path):
    """An int8 classifier converted from HF loads as the classifier, with its score head kept float, and computes
    what quantize_model makes of the float classifier."""
    from stablelm.quantize import quantize_model

    src, dst, flt = tmp_path / "hf", tmp_path / "int8", tmp_path / "fp32"
    hf = hf_model("StableLmForSequenceClassification", num_labels=3, hidden_size=128, intermediate_size=352)
    hf.save_pretrained(src)
    convert_weights.main([str(src), str(dst), "--quant", "int8"])
    convert_weights.main([str(src), str(flt)])
    ids, mask, _ = batch("right")
    model = stablelm.load(dst)
    assert type(model) is OurSeq and isinstance(model.score, torch.nn.Linear)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        ref = quantize_model(stablelm.load(flt), bits=8)(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
