"""Tokenizer tests: ids, padding, decoding and chat templates against transformers / sentencepiece.

Tokenizers are trained inside the tests on generated text (ASCII, accents, CJK, Cyrillic, emoji), so no model
files are needed: a GPT-NeoX-style byte-level BPE (with and without a bos-adding post-processor) and a
sentencepiece BPE with byte fallback.
"""
import io
import json
import os
import random

import numpy
import pytest
import torch

from stablelm.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EOS, PAD, BOS = "<|endoftext|>", "<|pad|>", "<|bos|>"
SPECIALS = [EOS, PAD, BOS, "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ["the", "heart", "size", "is", "normal", "lungs", "are", "clear", "no", "effusion", "café", "naïve",
         "über", "niño", "日本語", "中文", "привет", "γειά", "😀", "🚀", "👍🏽", "∑", "≈", "—", "…", "don't",
         "X-ray", "12", "3.5", "(left)", "[right]", "email@example.com"]

# A zephyr-format template written for these tests; block tags sit on their own indented lines so the output
# also depends on the trim_blocks/lstrip_blocks settings transformers renders with.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "    {% if message['role'] in ['system', 'user', 'assistant'] %}\n"
    "<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n"
    "    {% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "<|assistant|>\n"
    "{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "List 3 synonyms for the word \"tiny\""}],
    [{"role": "system", "content": "You are a radiologist."}, {"role": "user", "content": "Describe: café 😀"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!\nHow can I help?"},
     {"role": "user", "content": "  spaces  and <|endoftext|> inside  "}],
]


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(3, 12))
        sep = rng.choice([" ", " ", " ", "  ", "\n", ", "])
        out.append(sep.join(words) + rng.choice([".", "!", "?", "", "\n"]))
    return out


CORPUS = _sentences(400, seed=0)
STRINGS = _sentences(40, seed=1) + [
    "", " ", "   leading", "trailing   ", "\n\nnew\nlines\n", "tab\tseparated", "emoji 😀👍🏽 family 👨‍👩‍👧 ok",
    "中文字符测试 and ꙮ Ωmega unseen", EOS, f"hello{EOS}world", f"a {PAD} b", f"<|user|>\nHi{EOS}\n<|assistant|>\n",
    f"{BOS}{BOS} twice", "<|endoftext", "almost <|user| special",
]
MULTIBYTE = ["emoji 😀👍🏽 family 👨‍👩‍👧 ok", "中文字符测试 ꙮ Ωmega ≈ ∑", "naïve café über niño — …"]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """tokenizer.json files: 'neox' (byte-level post-processor, adds nothing) and 'bos' (TemplateProcessing)."""
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    root = tmp_path_factory.mktemp("bpe")
    tok.save(str(root / "neox.json"))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    tok.save(str(root / "bos.json"))
    return {"neox": root / "neox.json", "bos": root / "bos.json"}


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=420,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.98,
                                   user_defined_symbols=["<|user|>", "<|assistant|>"], minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def _ours(path, variant):
    return Tokenizer.from_file(path, eos_token=EOS, pad_token=PAD, bos_token=BOS if variant == "bos" else None)


def _hf(path, variant):
    from transformers import PreTrainedTokenizerFast
    kw = {"bos_token": BOS} if variant == "bos" else {}
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, pad_token=PAD, **kw)


def _write_dir(d, tokenizer_file, **files):
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    for name, content in files.items():
        (d / name.replace("__", ".")).write_text(content if isinstance(content, str) else json.dumps(content))
    return d


# ---------------------------------------------------------------- tokenizers backend vs transformers
@pytest.mark.parametrize("variant", ["neox", "bos"])
def test_encode_matches_transformers(bpe_files, variant):
    ours, hf = _ours(bpe_files[variant], variant), _hf(bpe_files[variant], variant)
    for text in STRINGS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), \
                (text, special)
    # the cases are not vacuous: the bos variant really adds bos, and special tokens in text are single ids
    with_bos = ours.encode("the heart", add_special_tokens=True)
    assert (with_bos[0] == ours.bos_id) == (variant == "bos")
    assert ours.encode(f"a{EOS}b", add_special_tokens=False).count(ours.eos_id) == 1
    assert ours.vocab_size == len(hf)


@pytest.mark.parametrize("variant", ["neox", "bos"])
def test_decode_matches_transformers_and_round_trips(bpe_files, variant):
    ours, hf = _ours(bpe_files[variant], variant), _hf(bpe_files[variant], variant)
    for text in STRINGS:
        ids = ours.encode(text, add_special_tokens=True)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
        assert ours.decode(torch.tensor(ids, dtype=torch.long), skip_special_tokens=False) == hf.decode(ids)
    assert ours.decode(ours.encode(f"a{EOS}b{PAD}"), skip_special_tokens=True) == "ab"
    ids = ours.encode(MULTIBYTE[0])  # other integer containers are accepted too
    dec = ours.stream_decoder()
    assert ours.decode(numpy.array(ids)) == ours.decode(ids) == "".join(dec.push(torch.tensor(i)) for i in ids)


@pytest.mark.parametrize("variant", ["neox", "bos"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_encode_batch_matches_transformers_padding(bpe_files, variant, side):
    ours, hf = _ours(bpe_files[variant], variant), _hf(bpe_files[variant], variant)
    hf.padding_side = side
    texts = STRINGS[:6] + MULTIBYTE + [f"hello{EOS}world", "x"]
    for special in (True, False):
        ids, mask = ours.encode_batch(texts, add_special_tokens=special, padding_side=side)
        ref = hf(texts, padding=True, return_tensors="pt", add_special_tokens=special)
        assert ids.dtype == mask.dtype == torch.long
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
        lists = ours.encode_batch(texts, add_special_tokens=special, padding_side=side, return_tensors=False)
        assert lists == (ids.tolist(), mask.tolist())
    assert (mask == 0).any(), "the batch must actually need padding"
    real = mask[:, -1] if side == "left" else mask[:, 0]
    assert bool(real.all()), "every row holds a real token at the padded-away edge"
    assert ours.decode_batch(ids) == [ours.decode(r) for r in ids.tolist()] == hf.batch_decode(
        ids, skip_special_tokens=True)
    assert ours.decode_batch(ids) == [t.replace(EOS, "") for t in texts]
    assert (ours.encode_batch(["a", "bbbbbbb"], pad_id=3)[0][0, 0]).item() == 3


@pytest.mark.parametrize("add_bos,add_eos", [(True, True), (True, False), (False, True), (False, False)])
def test_explicit_bos_eos_flags_match_transformers(bpe_files, add_bos, add_eos):
    from transformers import PreTrainedTokenizerFast
    for variant in ("neox", "bos"):
        ours = Tokenizer.from_file(bpe_files[variant], bos_token=BOS, eos_token=EOS, pad_token=PAD, add_bos=add_bos,
                                  add_eos=add_eos)
        hf = PreTrainedTokenizerFast(tokenizer_file=str(bpe_files[variant]), bos_token=BOS, eos_token=EOS,
                                     pad_token=PAD, add_bos_token=add_bos, add_eos_token=add_eos)
        for text in STRINGS[:10] + [f"hello{EOS}world"]:
            ids = ours.encode(text)
            assert ids == hf.encode(text), (variant, text)
            body = ours.encode(text, add_special_tokens=False)
            assert ids == [ours.bos_id] * add_bos + body + [ours.eos_id] * add_eos
        ids, _ = ours.encode_batch(["a b", "the heart is normal"], padding_side="right")
        assert ids.tolist() == hf(["a b", "the heart is normal"], padding=True)["input_ids"]


def test_vocabulary_with_holes(bpe_files, tmp_path):
    """tiktoken-converted vocabularies may skip ids: the id range is one past the largest id, not the count."""
    from transformers import PreTrainedTokenizerFast
    data = json.loads(bpe_files["neox"].read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    last = max(vocab, key=vocab.get)
    top = len(vocab) + 10
    vocab[last] = top
    path = tmp_path / "holes.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    ours, hf = Tokenizer.from_file(path, eos_token=EOS), PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert ours.vocab_size == top + 1 > len(hf)
    assert ours.token_to_id(last) == top and ours.id_to_token(top) == last
    text = ours.decode([top], skip_special_tokens=False)
    assert ours.encode(text * 3) == hf.encode(text * 3) and top in ours.encode(text * 3)
    with pytest.raises(ValueError, match="hole"):
        ours.id_to_token(top - 1)


def test_pad_falls_back_to_eos(bpe_files):
    tok = Tokenizer.from_file(bpe_files["neox"], eos_token=EOS)
    assert tok.pad_id == tok.eos_id == tok.token_to_id(EOS)
    ids, mask = tok.encode_batch(["a", "the heart is normal"])
    assert ids[0, 0].item() == tok.eos_id and mask[0, 0].item() == 0


def test_vocabulary_lookups(bpe_files):
    tok = _ours(bpe_files["neox"], "neox")
    for token in SPECIALS:
        assert tok.id_to_token(tok.token_to_id(token)) == token
    assert tok.token_to_id("definitely-not-a-token") is None
    assert {tok.eos_id, tok.pad_id, tok.token_to_id("<|user|>")} <= tok.special_ids
    assert tok.token_to_id("the") not in tok.special_ids
    assert tok.bos_id is None and tok.eos_ids == (tok.eos_id,)


# ---------------------------------------------------------------- from_dir with the config files
def test_from_dir_matches_transformers_from_pretrained(bpe_files, tmp_path):
    from transformers import PreTrainedTokenizerFast
    config = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
              "add_bos_token": True, "add_eos_token": True, "chat_template": ZEPHYR_TEMPLATE,
              "additional_special_tokens": ["<|user|>", "<|extra|>"], "clean_up_tokenization_spaces": True}
    d = _write_dir(tmp_path / "ckpt", bpe_files["neox"], tokenizer_config__json=config,
                   special_tokens_map__json={"pad_token": {"content": PAD, "special": True}, "eos_token": "<|system|>"},
                   generation_config__json={"eos_token_id": [0, 5]},
                   config__json={"config": {"eos_token_id": [4]}, "format": "stablelm"})
    ours = Tokenizer.from_dir(d)
    hf = PreTrainedTokenizerFast.from_pretrained(str(d))
    # special_tokens_map overrides (no added_tokens_decoder); a declared token missing from the vocab is appended
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    base = Tokenizer.from_file(bpe_files["neox"]).vocab_size
    assert ours.token_to_id("<|extra|>") == hf.convert_tokens_to_ids("<|extra|>") == base
    assert ours.vocab_size == len(hf) == base + 1
    assert ours.eos_token == "<|system|>" and ours.eos_ids == (ours.eos_id, 0, 5, 4)
    for text in STRINGS + ["the <|extra|> token"]:
        ids = ours.encode(text)
        # with tokenizer.json the post-processor decides; the config's add_bos/add_eos flags are not used
        assert ids == hf.encode(text) == ours.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_from_dir_reads_token_ids_and_template_file(bpe_files, tmp_path):
    from transformers import AutoTokenizer
    template = "{{ bos_token }}|{% if eos_token is defined %}{{ eos_token }}{% endif %}|{{ messages[0]['content'] }}"
    d = _write_dir(tmp_path / "ckpt", bpe_files["neox"], config__json={"bos_token_id": 2, "eos_token_id": 0},
                   chat_template__jinja=template)
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, None)
    assert tok.pad_id == tok.eos_id == 0
    assert tok.encode("the heart") == tok.encode("the heart", add_special_tokens=False)  # byte-level: no bos
    # the template sees the special tokens transformers knows: none here (config.json ids are not read by it)
    messages = [{"role": "user", "content": "x"}]
    ref = AutoTokenizer.from_pretrained(str(d)).apply_chat_template(messages, tokenize=False,
                                                                    add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == ref == "||x"
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    ref = AutoTokenizer.from_pretrained(str(d)).apply_chat_template(messages, tokenize=False)
    assert Tokenizer.from_dir(d).apply_chat_template(messages) == ref == f"{BOS}|{EOS}|x"


# ---------------------------------------------------------------- sentencepiece backend
def _sp_strings():
    return [s for s in STRINGS if "<" not in s]


def test_sentencepiece_matches_sentencepiece(sp_file):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    tok = Tokenizer.from_file(sp_file)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.eos_id())
    assert tok.vocab_size == sp.get_piece_size()
    byte_fallback_seen = False
    for text in _sp_strings():
        ids = sp.encode(text)
        byte_fallback_seen |= any(sp.is_byte(i) for i in ids)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.encode(text) == [sp.bos_id()] + ids
        assert tok.decode(tok.encode(text)) == sp.decode(ids)
    assert byte_fallback_seen, "the strings must exercise byte fallback"
    # user-defined symbols are sentencepiece's own business; control tokens in text are recognised as in HF
    assert tok.encode("hi <|user|> there", add_special_tokens=False) == sp.encode("hi <|user|> there")
    ids = tok.encode("the heart</s>clear", add_special_tokens=False)
    assert ids == sp.encode("the heart") + [sp.eos_id()] + sp.encode("clear")
    assert tok.decode(ids, skip_special_tokens=False) == "the heart</s>clear"
    assert tok.decode(ids) == sp.decode(ids)  # sentencepiece drops control pieces the same way
    texts = ["the heart is normal", "no"]
    rows = [tok.encode(t) for t in texts]
    fill = len(rows[0]) - len(rows[1])
    assert fill > 0
    ids, mask = tok.encode_batch(texts)
    assert ids.tolist() == [rows[0], [sp.eos_id()] * fill + rows[1]]
    assert mask.tolist() == [[1] * len(rows[0]), [0] * fill + [1] * len(rows[1])]


def test_sentencepiece_dir_flags(sp_file, tmp_path):
    d = tmp_path / "spdir"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(sp_file.read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True}))
    tok = Tokenizer.from_dir(d)
    assert tok.encode("the heart") == tok.encode("the heart", add_special_tokens=False) + [tok.eos_id]
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": "no"}))
    with pytest.raises(ValueError, match="tokenizer_config.json: add_bos_token: expected true or false"):
        Tokenizer.from_dir(d)


# ---------------------------------------------------------------- chat template
def test_builtin_zephyr_format_matches_transformers_template(bpe_files):
    tok, hf = _ours(bpe_files["neox"], "neox"), _hf(bpe_files["neox"], "neox")
    assert tok.chat_template is None
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        f"<|user|>\nHi{EOS}\n<|assistant|>\n"
    templated = Tokenizer.from_file(bpe_files["neox"], eos_token=EOS, chat_template=ZEPHYR_TEMPLATE)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ref = hf.apply_chat_template(messages, chat_template=ZEPHYR_TEMPLATE, tokenize=False,
                                         add_generation_prompt=gen)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == ref
            assert templated.apply_chat_template(messages, add_generation_prompt=gen) == ref
    ids = tok.encode(tok.apply_chat_template(CONVERSATIONS[1]), add_special_tokens=False)
    assert tok.token_to_id("<|system|>") in ids and tok.token_to_id("<|assistant|>") == ids[-2]


def test_jinja_environment_matches_transformers(bpe_files):
    template = "{% for m in messages %}{{ m | tojson }}{% if loop.last %}{% break %}{% endif %}{% endfor %}"
    tok = Tokenizer.from_file(bpe_files["neox"], eos_token=EOS, chat_template=template)
    hf = _hf(bpe_files["neox"], "neox")
    messages = CONVERSATIONS[1]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(messages, chat_template=template,
                                                                      tokenize=False, add_generation_prompt=True)
    assert "😀" in tok.apply_chat_template(messages)


@pytest.mark.parametrize("messages,error,match,templated", [
    # the built-in zephyr format knows its roles and needs str content; a jinja template decides for itself
    ([{"role": "tool", "content": "x"}], ValueError, "role 'tool'", False),
    ([{"role": "user"}], TypeError, "content", False),
    ([{"role": "user", "content": 3}], TypeError, "content", False),
    ([], ValueError, "non-empty", True),
    (["hi"], TypeError, r"messages\[0\]", True),
    ([{"content": "hi"}], ValueError, "no 'role'", True),
])
def test_chat_template_rejects_bad_messages(bpe_files, messages, error, match, templated):
    for template in (None, ZEPHYR_TEMPLATE) if templated else (None,):
        tok = Tokenizer.from_file(bpe_files["neox"], eos_token=EOS, chat_template=template)
        with pytest.raises(error, match=match):
            tok.apply_chat_template(messages)


def test_chat_template_errors(bpe_files):
    raising = "{{ raise_exception('only one turn') }}"
    tok = Tokenizer.from_file(bpe_files["neox"], eos_token=EOS, chat_template=raising)
    with pytest.raises(ValueError, match="only one turn"):
        tok.apply_chat_template(CONVERSATIONS[0])
    tok = Tokenizer.from_file(bpe_files["neox"], eos_token=EOS, chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="not a valid jinja2 template"):
        tok.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="no eos token"):
        Tokenizer.from_file(bpe_files["neox"]).apply_chat_template(CONVERSATIONS[0])


# ---------------------------------------------------------------- streaming
def _stream(tok, ids, skip):
    dec = tok.stream_decoder(skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


@pytest.mark.parametrize("backend", ["bpe", "sp"])
def test_stream_decoder_concatenates_to_decode(bpe_files, sp_file, backend):
    tok = _ours(bpe_files["neox"], "neox") if backend == "bpe" else Tokenizer.from_file(sp_file)
    held = 0
    for text in MULTIBYTE + _sentences(5, seed=2) + [f"the heart{EOS} 😀 is</s> normal"]:
        ids = tok.encode(text)
        held += sum("\ufffd" in tok.decode([i]) for i in ids)
        for skip in (True, False):
            pieces, rest = _stream(tok, ids, skip)
            assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in p for p in pieces), pieces
            assert sum(bool(p) for p in pieces) > 1, "text must come out incrementally"
    assert held > 0, "some characters must span several tokens"


def test_stream_decoder_flushes_incomplete_character(bpe_files):
    tok = _ours(bpe_files["neox"], "neox")
    ids = tok.encode("ok 👨‍👩‍👧")
    cut = next(k for k in range(len(ids), 0, -1) if tok.decode(ids[:k]).endswith("\ufffd"))
    pieces, rest = _stream(tok, ids[:cut], skip=True)
    assert pieces[-1] == "" and rest.endswith("\ufffd")
    assert "".join(pieces) + rest == tok.decode(ids[:cut])
    dec = tok.stream_decoder()
    assert dec.flush() == "" and dec.push(ids[0]) == tok.decode(ids[:1])  # reusable after flush


# ---------------------------------------------------------------- errors
def test_load_errors(bpe_files, sp_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: cannot load"):
        Tokenizer.from_dir(bad)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="sentencepiece"):
        Tokenizer.from_file(tmp_path / "tokenizer.model")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="expected a tokenizers file"):
        Tokenizer.from_file(tmp_path / "vocab.txt")
    d = _write_dir(tmp_path / "badconfig", bpe_files["neox"], tokenizer_config__json="{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_dir(d)
    d = _write_dir(tmp_path / "badtoken", bpe_files["neox"], tokenizer_config__json={"eos_token": 7})
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.from_dir(d)
    with pytest.raises(ValueError, match="add_bos is set but the tokenizer has no bos"):
        Tokenizer.from_file(bpe_files["neox"], eos_token=EOS, add_bos=True)
    with pytest.raises(ValueError, match="not a piece of tokenizer.model"):
        Tokenizer.from_file(sp_file, pad_token="<|not-there|>")


def test_call_errors(bpe_files):
    tok = _ours(bpe_files["neox"], "neox")
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(123)
    with pytest.raises(ValueError, match="non-empty list of str"):
        tok.encode_batch("a single string")
    with pytest.raises(ValueError, match="non-empty list of str"):
        tok.encode_batch([])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok.encode_batch(["a", None])
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode_batch(["a"], padding_side="middle")
    with pytest.raises(ValueError, match="pad_id"):
        Tokenizer.from_file(bpe_files["neox"]).encode_batch(["a", "bb"])
    with pytest.raises(ValueError, match="negative"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="negative"):
        tok.decode_batch([[1], [-3]])
    with pytest.raises(TypeError, match="must be an integer"):
        tok.decode([1, "2"])
    with pytest.raises(ValueError, match="1-D integer tensor"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, S\] tensor"):
        tok.decode_batch(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_token(10**6)
    with pytest.raises(ValueError, match="negative"):
        tok.stream_decoder().push(-1)


# ---------------------------------------------------------------- errors name the directory / file
def test_from_dir_errors_name_the_directory_and_files(bpe_files, tmp_path):
    from stablelm.tokenizer import TokenizerFileError
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer.from_dir(missing)
    assert str(missing) in str(e.value) and "tokenizer.json or tokenizer.model" in str(e.value)
    assert "tokenizer directory" not in str(e.value)  # a model dir is not "a tokenizer directory"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        Tokenizer.from_dir(tmp_path / "file")
    d = _write_dir(tmp_path / "weights-only", bpe_files["neox"])
    (d / "tokenizer.json").unlink()
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer.json or tokenizer.model \(found: model.safet"):
        Tokenizer.from_dir(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "config.json"):
        d = _write_dir(tmp_path / f"bad-{name}", bpe_files["neox"])
        (d / name).write_text('{"truncated": ')
        with pytest.raises(TokenizerFileError) as e:
            Tokenizer.from_dir(d)
        assert e.value.path == d / name and str(d / name) in str(e.value), name
        assert e.value.__cause__ is None or not isinstance(e.value.__cause__, json.JSONDecodeError)


# (file, corrupted value) pairs: each must load or raise TokenizerFileError naming that file
BAD_FIELDS = [
    ("tokenizer_config.json", {"eos_token": 7}),
    ("tokenizer_config.json", {"eos_token": {"content": 7}}),
    ("tokenizer_config.json", {"additional_special_tokens": "<|user|>"}),
    ("tokenizer_config.json", {"additional_special_tokens": [3]}),
    ("tokenizer_config.json", {"added_tokens_decoder": ["x"]}),
    ("tokenizer_config.json", {"added_tokens_decoder": {"5": {"content": None, "special": True}}}),
    ("tokenizer_config.json", {"chat_template": {"a": 1}}),
    ("tokenizer_config.json", {"clean_up_tokenization_spaces": "yes"}),
    ("tokenizer_config.json", ["not", "an", "object"]),
    ("tokenizer_config.json", {"eos_token": ""}),
    ("tokenizer_config.json", {"extra_special_tokens": {"image_token": 3}}),
    ("special_tokens_map.json", {"pad_token": ["x"]}),
    ("generation_config.json", {"eos_token_id": "0"}),
    ("generation_config.json", {"eos_token_id": [0, None]}),
    ("generation_config.json", {"eos_token_id": [10 ** 9]}),
    ("config.json", {"bos_token_id": 1.5}),
]


@pytest.mark.parametrize("name,content", BAD_FIELDS)
def test_bad_config_fields_name_the_file(bpe_files, tmp_path, name, content):
    from stablelm.tokenizer import TokenizerFileError
    d = _write_dir(tmp_path / "ckpt", bpe_files["neox"])
    (d / name).write_text(json.dumps(content))
    with pytest.raises(TokenizerFileError) as e:
        Tokenizer.from_dir(d)
    assert e.value.path == d / name


def test_corrupted_tokenizer_files_fuzz(bpe_files, tmp_path):
    """Seeded corruption (truncation, byte flips, bytes spliced in) of tokenizer.json and tokenizer_config.json:
    each case loads or raises TokenizerFileError naming the corrupted file; never another exception."""
    from stablelm.tokenizer import TokenizerFileError
    rng = random.Random(1234)
    config = json.dumps({"bos_token": EOS, "eos_token": EOS, "chat_template": ZEPHYR_TEMPLATE,
                         "added_tokens_decoder": {"0": {"content": EOS, "special": True}}}).encode()
    originals = {"tokenizer.json": bpe_files["neox"].read_bytes(), "tokenizer_config.json": config}
    cases = loaded = 0
    for name, data in originals.items():
        for k in range(60):
            b = bytearray(data)
            kind = k % 3
            if kind == 0:
                b = b[:rng.randrange(len(b))]
            elif kind == 1:
                for _ in range(rng.randint(1, 8)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
            else:
                at = rng.randrange(len(b))
                b[at:at] = rng.choice([b'"', b"{", b"]", b"null", b"\xff", b'"x":1,', b"-1"])
            d = tmp_path / f"case-{name}-{k}"
            d.mkdir()
            (d / "tokenizer.json").write_bytes(originals["tokenizer.json"])
            (d / "tokenizer_config.json").write_bytes(originals["tokenizer_config.json"])
            (d / name).write_bytes(bytes(b))
            cases += 1
            try:
                tok = Tokenizer.from_dir(d)
            except TokenizerFileError as e:
                assert e.path == d / name, (name, k, e)
                continue
            loaded += 1
            tok.decode(tok.encode("the heart 😀"))
    assert cases == 120 and loaded < cases
