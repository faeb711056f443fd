"""Id-for-id parity with transformers' fast tokenizer for the two tokenizer shapes real StableLM checkpoints ship.

- "neox": GPT-NeoX-style byte-level BPE (stablelm-3b-4e1t, stablelm-zephyr-3b): NFC normalizer, ByteLevel
  pre-tokenizer, `<|endoftext|>` / `<|padding|>`, whitespace-run added tokens (non-special, normalized) and chat
  tokens (`<|user|>`, `<|assistant|>`, ...); tokenizer_config.json names tokenizer_class GPTNeoXTokenizer and is
  loaded with `AutoTokenizer.from_pretrained(dir)` (which rebuilds the same pipeline from the vocab and merges).
- "arcade": Arcade100k / tiktoken-style (stablelm-2): cl100k regex Split pre-tokenizer then byte-level without
  its own regex, no normalizer, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, FIM tokens; tokenizer_class
  GPT2TokenizerFast. Compared with `PreTrainedTokenizerFast.from_pretrained(dir)`, which keeps tokenizer.json's
  pipeline: transformers 5's AutoTokenizer maps GPT2TokenizerFast to GPT2Tokenizer, whose __init__ rebuilds the
  backend with GPT-2's ByteLevel regex and so drops the cl100k split the model was trained with (checked below).

Each tokenizer is trained here on generated mixed text; nothing is downloaded.
"""
import json
import os
import random
import unicodedata

import pytest
import torch

from stablelm.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EOS, PAD = "<|endoftext|>", "<|padding|>"
CL100K = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
          r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
CHAT_TOKENS = {"neox": ["<|system|>", "<|user|>", "<|assistant|>"],
               "arcade": ["<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]}

CODE = '''def heart_size(report: str) -> float:
    """Return the cardiothoracic ratio."""
\tif not report:
\t\treturn 0.0  # nothing to do
    values = [float(x) for x in report.split(",") if x.strip()]
    return sum(values) / max(len(values), 1)

class Finding(dict):
    def __init__(self, **kw):  super().__init__(kw)
'''
WORDS = ["the", "heart", "size", "is", "normal", "lungs", "are", "clear", "no", "effusion", "café", "naïve",
         "über", "niño", "Ångström", "日本語", "中文", "한국어", "привет", "γειά", "שלום", "مرحبا", "😀", "🚀",
         "👍🏽", "👨‍👩‍👧", "∑", "≈", "—", "…", "don't", "DON'T", "I'm", "we'll", "X-ray", "12", "3.5",
         "1234567", "(left)", "[right]", "{key: value}", "email@example.com", "https://example.org/a?b=c",
         "foo_bar", "x+=1", "a->b", "#include", "<div>", "&amp;"]
SEPARATORS = [" ", " ", " ", "  ", "   ", "\n", "\n\n", "\t", " \t ", ", ", "\r\n", "        "]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(WORDS)]
        for _ in range(rng.randint(2, 14)):
            parts += [rng.choice(SEPARATORS), rng.choice(WORDS)]
        out.append("".join(parts) + rng.choice([".", "!", "?", "", "\n", " "]))
    return out


CORPUS = _texts(500, seed=0) + [CODE] * 20
MIXED = _texts(30, seed=1) + [
    "", " ", "  ", "\n", "\t", "   leading spaces", "trailing spaces    ", "\n\nnew\nlines\n\n\n", "\r\nwindows\r\n",
    "tab\tseparated\t\tvalues", " " * 23 + "deep indent", " " * 40, "\t" * 5 + "x", CODE,
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇩🇪🇯🇵 ok", "中文字符测试 and ꙮ Ωmega unseen 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "decomposed e\u0301 vs composed é, A\u030a vs Å", "zero\u200bwidth and nbsp\u00a0here",
    "numbers 1 12 123 1234 12345 123456789 3.14159 -42 1e10", "DON'T I'M WE'LL you're it's",
    "hello , world . do n't ' quote ' ?", f"{EOS}", f"hello{EOS}world", f"{EOS}{EOS}", f"a {EOS} b",
    f" {EOS} ", "<|endoftext", "almost <|endoftext|", "<|user|>\nHi there" + EOS + "\n<|assistant|>\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n日本語?<|im_end|>\n<|im_start|>assistant\n",
    "<|fim_prefix|>def f(x):<|fim_suffix|>    return x<|fim_middle|>", f"{PAD} padded {PAD}",
]


def _build(kind: str, root):
    """tokenizer.json + tokenizer_config.json as the real checkpoints of that shape have them."""
    from tokenizers import AddedToken, Regex, Tokenizer as RustTokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers
    tok = RustTokenizer(models.BPE())
    if kind == "neox":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True)
        specials = [EOS, PAD]
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CL100K), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
        specials = [EOS]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if kind == "neox":
        # GPT-NeoX's whitespace-run tokens: ordinary (non-special) added tokens, matched after normalization
        tok.add_tokens([AddedToken(" " * k, normalized=True, special=False) for k in range(24, 1, -1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS[kind]])
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    decoder = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                        "single_word": t.single_word, "special": t.special}
               for i, t in sorted(tok.get_added_tokens_decoder().items())}
    config = {"add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": EOS, "eos_token": EOS,
              "unk_token": EOS, "clean_up_tokenization_spaces": True, "model_max_length": 4096,
              "tokenizer_class": "GPTNeoXTokenizer" if kind == "neox" else "GPT2TokenizerFast"}
    if kind == "neox":
        config["additional_special_tokens"] = CHAT_TOKENS["neox"]
    (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return root


@pytest.fixture(scope="module", params=["neox", "arcade"])
def pair(request, tmp_path_factory):
    """(kind, our Tokenizer, transformers' tokenizer) for one checkpoint shape."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    d = _build(request.param, tmp_path_factory.mktemp(request.param))
    if request.param == "neox":
        hf = AutoTokenizer.from_pretrained(str(d))
        assert type(hf).__name__ == "GPTNeoXTokenizer"
    else:
        hf = PreTrainedTokenizerFast.from_pretrained(str(d))
    return request.param, Tokenizer.from_dir(d), hf, d


def test_vocabulary_and_special_tokens(pair):
    kind, ours, hf, _ = pair
    assert ours.vocab_size == len(hf)
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id)
    # GPTNeoXTokenizer's pad default is <|padding|>; GPT2's is none (we then pad with eos)
    assert ours.pad_token == hf.pad_token == (PAD if kind == "neox" else None)
    for token in CHAT_TOKENS[kind] + [EOS]:
        assert ours.token_to_id(token) == hf.convert_tokens_to_ids(token)
        assert ours.token_to_id(token) in ours.special_ids
    assert set(hf.all_special_ids) <= ours.special_ids


def test_encode_matches(pair):
    kind, ours, hf, _ = pair
    for text in MIXED:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), \
                (kind, text)
    # not vacuous: specials in text are one id each, whitespace runs use their tokens, unicode needs byte merges
    assert ours.encode(f"a{EOS}b").count(ours.eos_id) == 1
    assert all(ours.encode(t) == [ours.token_to_id(t)] for t in CHAT_TOKENS[kind])
    if kind == "neox":
        assert ours.token_to_id(" " * 23) in ours.encode(" " * 23 + "deep indent")
        assert ours.encode("e\u0301") == ours.encode("é")  # NFC
    else:
        assert ours.encode("e\u0301") != ours.encode("é")  # no normalizer
        digits = ours.encode("123456789")
        assert ours.decode(digits[:1]) == "123"  # cl100k splits digits in threes


def test_encode_batch_left_padding_matches(pair):
    kind, ours, hf, _ = pair
    if hf.pad_token is None:
        hf.pad_token = EOS  # transformers cannot pad without one; ours pads with eos
    hf.padding_side = "left"
    texts = MIXED[-30:]
    ids, mask = ours.encode_batch(texts)
    ref = hf(texts, padding=True, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert (mask == 0).any() and bool(mask[:, -1].all())
    assert ours.decode_batch(ids) == hf.batch_decode(ids, skip_special_tokens=True)
    assert ours.decode_batch(ids, skip_special_tokens=False) == hf.batch_decode(ids, skip_special_tokens=False)


def test_decode_matches(pair):
    kind, ours, hf, _ = pair
    for text in MIXED:
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), \
                (kind, text)
        # byte-level BPE round-trips exactly (after NFC for neox); clean_up_tokenization_spaces: true in the
        # config must not eat the space of "hello , world" (transformers 5 ignores it for BPE)
        expected = text if kind == "arcade" else unicodedata.normalize("NFC", text)
        assert ours.decode(ids, skip_special_tokens=False) == expected
    # single ids that are half a character decode to U+FFFD, as in transformers
    ids = ours.encode("👨‍👩‍👧")
    assert [ours.decode([i]) for i in ids] == [hf.decode([i]) for i in ids]


def test_ids_past_the_vocabulary_decode_as_transformers(pair):
    """StableLM embeddings are padded (50304 rows for ~50280 ids): generated ids may lie past the tokenizer."""
    kind, ours, hf, _ = pair
    n = ours.vocab_size
    ids = ours.encode("the heart 😀 is normal") + [n, n + 7, n + 100]
    ids.insert(2, n + 1)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids) == "the heart 😀 is normal"
    batch = torch.tensor([ids, [n + 3] * len(ids)])
    assert ours.decode_batch(batch) == hf.batch_decode(batch, skip_special_tokens=True) == [ours.decode(ids), ""]
    dec = ours.stream_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == ours.decode(ids)


def test_tokenizers_file_itself_agrees(pair):
    """Our ids are tokenizer.json's ids; for arcade, transformers 5's AutoTokenizer is the one that differs."""
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import AutoTokenizer
    kind, ours, _, d = pair
    raw = RustTokenizer.from_file(str(d / "tokenizer.json"))
    for text in MIXED:
        assert ours.encode(text) == raw.encode(text).ids
    if kind == "arcade":
        auto = AutoTokenizer.from_pretrained(str(d))
        differs = [t for t in MIXED if auto.encode(t) != ours.encode(t)]
        # GPT2Tokenizer's rebuilt pipeline splits with GPT-2's regex, not the tokenizer.json's cl100k Split
        assert differs == [] or "Split" not in repr(auto.backend_tokenizer.pre_tokenizer)


# ---------------------------------------------------------------- clean_up_tokenization_spaces
def test_clean_up_applies_to_non_bpe_models_as_in_transformers(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer
    vocab = {"[UNK]": 0, EOS: 1, **{w: i + 2 for i, w in enumerate(
        ["hello", ",", "world", ".", "do", "n't", "'", "s", "it", "?", "!"])}}
    tok = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.WordPiece(cleanup=False)
    tok.add_special_tokens([EOS])
    tok.save(str(tmp_path / "tokenizer.json"))
    text = "hello , world . do n't it ' s ? !"
    for clean in (True, False):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": EOS, "unk_token": "[UNK]", "clean_up_tokenization_spaces": clean}))
        ours, hf = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
        ids = ours.encode(text)
        assert ids == hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode_batch([ids, ids]) == hf.batch_decode([ids, ids], skip_special_tokens=True)
        for override in (True, False):
            assert ours.decode(ids, clean_up_tokenization_spaces=override) == hf.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=override)
    cleaned = Tokenizer.from_dir(tmp_path).decode(ids, clean_up_tokenization_spaces=True)
    assert cleaned.startswith("hello, world.") and cleaned.endswith("?!")  # the clean-up really ran


@pytest.mark.parametrize("force", [True, False])
def test_clean_up_forced_for_bpe(tmp_path, force):
    from transformers import AutoTokenizer
    d = _build("arcade", tmp_path / "bpe")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = force
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
    ids = ours.encode("hello , world . do n't ?")
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert (ours.decode(ids) == "hello, world. don't?") == force
