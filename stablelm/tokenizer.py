"""Text <-> token ids for StableLM checkpoints, without importing transformers at run time.

Two backends behind one `Tokenizer`:
- `tokenizer.json` through the `tokenizers` library (every public StableLM checkpoint: GPT-NeoX BPE for
  stablelm-3b-4e1t / zephyr / stable-code, the tiktoken-converted Arcade100k BPE for stablelm-2);
- `tokenizer.model` through sentencepiece.
`tokenizer_config.json` / `special_tokens_map.json` name the bos/eos/pad/unk tokens, extra special tokens, the
chat template (also read from `chat_template.jinja`) and, for sentencepiece, the add_bos/add_eos flags;
`generation_config.json` / `config.json` fill a missing bos/eos and add further stop ids (`eos_ids`).
Behaviour follows transformers' fast tokenizers: ids from `encode` match `PreTrainedTokenizerFast`, batches are
left padded for generation, and the chat template is rendered with the same jinja2 settings.
"""
from __future__ import annotations

import json
import operator
import re
from datetime import datetime
from pathlib import Path

import torch

CHAT_ROLES = ("system", "user", "assistant")
_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


# ---------------------------------------------------------------- backends
class _TokenizersBackend:
    """tokenizer.json through `tokenizers`; its post-processor adds the special tokens of `encode`."""

    def __init__(self, tok):
        # Padding/truncation stored in tokenizer.json would silently change encode_batch's output;
        # padding is done by Tokenizer.encode_batch and sequences are never cut here.
        tok.no_padding()
        tok.no_truncation()
        self.tok = tok
        self.special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        # One past the largest id, not the token count: a converted vocabulary (tiktoken's) may have holes.
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @classmethod
    def load(cls, path: Path):
        from tokenizers import Tokenizer as RustTokenizer
        try:
            return cls(RustTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise ValueError(f"cannot load {path} as a tokenizers tokenizer.json: {e}") from e

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def own_tokens(self) -> dict[str, str]:
        return {}  # tokenizer.json does not say which of its tokens is bos/eos/pad/unk

    def add_special(self, token: str) -> int:
        from tokenizers import AddedToken
        self.tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        i = self.tok.token_to_id(token)
        self.special.add(i)
        self.vocab_size = max(self.vocab_size, i + 1)
        return i

    def encode(self, text: str, native_specials: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=native_specials).ids

    def encode_batch(self, texts: list[str], native_specials: bool) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=native_specials)]

    def decode(self, ids: list[int]) -> str:
        # Skipping is done by the caller (one rule for both backends), so nothing is dropped here.
        return self.tok.decode(ids, skip_special_tokens=False)

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return self.tok.decode_batch(batch, skip_special_tokens=False)


class _SentencePieceBackend:
    """tokenizer.model through sentencepiece; bos/eos are added by Tokenizer (sentencepiece has no post-processor)."""

    def __init__(self, sp):
        self.sp = sp
        n = sp.get_piece_size()
        self.special = {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        self._split = None

    @classmethod
    def load(cls, path: Path):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot load {path} as a sentencepiece model: {e}") from e
        return cls(sp)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces; only the unk piece itself really maps there.
        return None if self.sp.is_unknown(i) and self.sp.id_to_piece(i) != token else i

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def own_tokens(self) -> dict[str, str]:
        """The bos/eos/pad/unk pieces the model was trained with (an id of -1 means none)."""
        ids = {"bos_token": self.sp.bos_id(), "eos_token": self.sp.eos_id(), "pad_token": self.sp.pad_id(),
               "unk_token": self.sp.unk_id()}
        return {k: self.sp.id_to_piece(i) for k, i in ids.items() if 0 <= i < self.vocab_size}

    def add_special(self, token: str) -> int:
        raise ValueError(f"special token {token!r} is not a piece of tokenizer.model; tokens beyond the "
                         "sentencepiece vocabulary are not supported")

    def _pieces(self, text: str) -> list[int]:
        # Special tokens written in the text become their ids (as transformers does); sentencepiece alone would
        # spell "</s>" out as ordinary pieces. Each stretch between them is encoded on its own.
        if self._split is None:
            names = sorted({self.sp.id_to_piece(i) for i in self.special}, key=len, reverse=True)
            self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else False
        if not self._split:
            return self.sp.encode(text)
        ids = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode(self, text: str, native_specials: bool) -> list[int]:
        return self._pieces(text)

    def encode_batch(self, texts: list[str], native_specials: bool) -> list[list[int]]:
        return [self._pieces(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        # Special ids are written as their piece text; the runs between them are decoded by sentencepiece
        # (which would otherwise drop control pieces and write unk as " ⁇ ").
        out, run = [], []
        for i in ids:
            if i in self.special:
                out.append(self.sp.decode(run))
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]


# ---------------------------------------------------------------- reading checkpoint files
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(value, where: str) -> str | None:
    """A special token as written in a config: a string, an AddedToken dict ({"content": ...}) or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a token string or {{'content': str}}, got {value!r}")


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def _chat_template(d: Path, config: dict) -> str | None:
    # Newer checkpoints keep the template in chat_template.jinja; older ones inside tokenizer_config.json,
    # either as a string or as a list of named templates of which "default" is the chat one.
    file = d / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise ValueError(f"{d / 'tokenizer_config.json'}: chat_template lists {sorted(map(str, named))} "
                             "but no 'default' template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{d / 'tokenizer_config.json'}: chat_template must be a string, got {template!r}")
    return template


def _load_backend(path: Path):
    if path.name.endswith(".json"):
        return _TokenizersBackend.load(path)
    if path.suffix == ".model":
        return _SentencePieceBackend.load(path)
    raise ValueError(f"{path}: expected a tokenizers file (*.json) or a sentencepiece model (*.model)")


# ---------------------------------------------------------------- chat templates
def _zephyr_chat(messages: list[dict], add_generation_prompt: bool, eos_token: str) -> str:
    """stablelm-zephyr-3b's format: each turn is `<|role|>\\n{content}{eos}\\n`, then `<|assistant|>\\n`."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}{eos_token}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


def _compile_jinja(source: str):
    """Compile a chat template with the environment transformers uses, so outputs match character for character."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("rendering a checkpoint's chat_template needs jinja2 (pip install jinja2)") from e

    def raise_exception(message):
        raise ValueError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    # jinja's own tojson escapes HTML characters and ASCII-escapes text; templates expect plain JSON.
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not a valid jinja2 template (line {e.lineno}): {e.message}") from e


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"messages[{k}] must be a dict, got {type(m).__name__}")
        if m.get("role") not in CHAT_ROLES:
            raise ValueError(f"messages[{k}] has role {m.get('role')!r}; expected one of {CHAT_ROLES}")
        if not isinstance(m.get("content"), str):
            raise TypeError(f"messages[{k}]['content'] must be a str, got {type(m.get('content')).__name__}")


# ---------------------------------------------------------------- the tokenizer
class Tokenizer:
    """Encode/decode, left-padded batches, special ids, streaming decode and the chat template.

    Build it with `Tokenizer.from_dir(checkpoint_dir)` or `Tokenizer.from_file("tokenizer.json")`.
    With tokenizer.json, `add_bos`/`add_eos` of None keep its post-processor (what transformers 5 does: it
    ignores tokenizer_config.json's add_bos_token/add_eos_token when tokenizer.json is present); a bool
    replaces it. With sentencepiece, which has no post-processor, None means bos on and eos off.
    """

    def __init__(self, backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, extra_special_tokens=(),
                 add_bos: bool | None = None, add_eos: bool | None = None, chat_template: str | None = None,
                 extra_eos_ids=()):
        self._backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        ids = {}
        for token in (bos_token, eos_token, pad_token, unk_token, *extra_special_tokens):
            if token is None or token in ids:
                continue
            i = backend.token_to_id(token)
            # transformers appends declared special tokens missing from the vocabulary; so do we.
            ids[token] = backend.add_special(token) if i is None else i
            backend.special.add(ids[token])
        self.bos_id = ids.get(bos_token)
        self.eos_id = ids.get(eos_token)
        # StableLM checkpoints define no pad token and pad with eos.
        self.pad_id = ids[pad_token] if pad_token is not None else self.eos_id
        self.unk_id = ids.get(unk_token)
        self.special_ids = frozenset(backend.special)
        self.eos_ids = tuple(dict.fromkeys(([] if self.eos_id is None else [self.eos_id]) + list(extra_eos_ids)))
        self.eos_ids = tuple(self._check_id(i, "eos id") for i in self.eos_ids)

        if isinstance(backend, _SentencePieceBackend) and add_bos is None:
            add_bos = self.bos_id is not None
        self._framed = add_bos is not None or add_eos is not None
        self._add_bos, self._add_eos = bool(add_bos), bool(add_eos)
        if self._add_bos and self.bos_id is None:
            raise ValueError("add_bos is set but the tokenizer has no bos token")
        if self._add_eos and self.eos_id is None:
            raise ValueError("add_eos is set but the tokenizer has no eos token")
        self.chat_template = chat_template
        self._compiled_template = None

    # ------------------------------------------------ construction
    @classmethod
    def from_file(cls, path, *, bos_token: str | None = None, eos_token: str | None = None,
                  pad_token: str | None = None, unk_token: str | None = None, add_bos: bool | None = None,
                  add_eos: bool | None = None, chat_template: str | None = None) -> "Tokenizer":
        """A tokenizer.json or tokenizer.model alone; special tokens are named by the arguments.

        A sentencepiece model already knows its bos/eos/unk/pad pieces; they are used where not given.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        backend = _load_backend(path)
        given = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        tokens = {k: v if v is not None else backend.own_tokens().get(k) for k, v in given.items()}
        return cls(backend, **tokens, add_bos=add_bos, add_eos=add_eos, chat_template=chat_template)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """A checkpoint directory: tokenizer.json (preferred) or tokenizer.model, plus the optional configs."""
        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(f"tokenizer directory {d} does not exist")
        file = next((d / n for n in ("tokenizer.json", "tokenizer.model") if (d / n).is_file()), None)
        if file is None:
            raise FileNotFoundError(f"{d} has no tokenizer.json or tokenizer.model (found: "
                                    f"{sorted(p.name for p in d.iterdir()) or 'nothing'})")
        config = _read_json(d / "tokenizer_config.json")
        # As in transformers: special_tokens_map.json is the older format, read (and winning) only when
        # tokenizer_config.json has no added_tokens_decoder.
        special_map = {} if "added_tokens_decoder" in config else _read_json(d / "special_tokens_map.json")
        tokens = {k: _token_text({**config, **special_map}.get(k), f"{d}: {k}") for k in _TOKEN_KEYS}
        extra = []
        for source in (config, special_map):
            for key in ("additional_special_tokens", "extra_special_tokens"):
                values = source.get(key) or []
                if isinstance(values, list):  # a dict here names model-specific tokens, not extra specials
                    extra += [_token_text(v, f"{d}: {key}") for v in values]
        for i, entry in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            if isinstance(entry, dict) and entry.get("special"):
                extra.append(_token_text(entry, f"{d}: added_tokens_decoder[{i}]"))

        # Token ids from the model/generation configs fill missing bos/eos and add further stop ids.
        model_config = _read_json(d / "config.json")
        if isinstance(model_config.get("config"), dict):  # this project's converted format nests the fields
            model_config = model_config["config"]
        generation = _read_json(d / "generation_config.json")
        backend = _load_backend(file)
        for key, token in backend.own_tokens().items():
            if tokens[key] is None:
                tokens[key] = token
        for key in ("bos_token", "eos_token"):
            ids = _id_list(generation.get(key + "_id", model_config.get(key + "_id")))
            if tokens[key] is None and ids and 0 <= ids[0] < backend.vocab_size:
                tokens[key] = backend.id_to_token(ids[0])
        extra_eos = _id_list(generation.get("eos_token_id")) + _id_list(model_config.get("eos_token_id"))
        flags = {} if isinstance(backend, _TokenizersBackend) else {
            "add_bos": config.get("add_bos_token"), "add_eos": config.get("add_eos_token")}
        return cls(backend, **tokens, extra_special_tokens=extra, **flags, chat_template=_chat_template(d, config),
                   extra_eos_ids=extra_eos)

    # ------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """One past the largest token id, added tokens included (the model's embedding may be larger still)."""
        return self._backend.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string, or None when the vocabulary lacks it."""
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        i = self._check_id(i, "token id")
        token = self._backend.id_to_token(i)
        if token is None:
            raise ValueError(f"token id {i} is a hole in the vocabulary: no token has it")
        return token

    def _check_id(self, i, what: str) -> int:
        try:
            i = operator.index(i)  # ints, numpy integers, 0-d integer tensors
        except TypeError:
            raise TypeError(f"{what} must be an integer, got {type(i).__name__}") from None
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"{what} {i} is outside the vocabulary [0, {self.vocab_size})")
        return i

    # ------------------------------------------------ encode
    def _frame(self, ids: list[int]) -> list[int]:
        return ([self.bos_id] if self._add_bos else []) + ids + ([self.eos_id] if self._add_eos else [])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text; special tokens written in the text map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        native = add_special_tokens and not self._framed
        ids = self._backend.encode(text, native)
        return self._frame(ids) if add_special_tokens and self._framed else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True, padding_side: str = "left",
                     pad_id: int | None = None, return_tensors: bool = True):
        """Encode and pad to the longest text: (input_ids, attention_mask), each [B, S].

        Left padding (the default) puts every sequence's last token in the final column, which is what
        batched generation needs. LongTensors with return_tensors, else lists of lists.
        """
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError("encode_batch expects a non-empty list of str")
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{k}] must be a str, got {type(t).__name__}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad_id = self.pad_id if pad_id is None else pad_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad or eos token: pass pad_id")
        pad_id = self._check_id(pad_id, "pad_id")
        native = add_special_tokens and not self._framed
        seqs = self._backend.encode_batch(list(texts), native)
        if add_special_tokens and self._framed:
            seqs = [self._frame(s) for s in seqs]
        width = max(map(len, seqs))
        ids, mask = [], []
        for s in seqs:
            fill = width - len(s)
            if padding_side == "left":
                ids.append([pad_id] * fill + s)
                mask.append([0] * fill + [1] * len(s))
            else:
                ids.append(s + [pad_id] * fill)
                mask.append([1] * len(s) + [0] * fill)
        if return_tensors:
            return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        return ids, mask

    # ------------------------------------------------ decode
    def _as_ids(self, ids, what: str) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex:
                raise ValueError(f"{what} must be a 1-D integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
            ids = ids.tolist()
        return [self._check_id(i, f"{what} entry") for i in ids]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (list or 1-D tensor); special tokens are dropped unless asked for."""
        ids = self._as_ids(ids, "ids")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._backend.decode(ids)

    def decode_batch(self, batch, skip_special_tokens: bool = True) -> list[str]:
        """decode for every row of a [B, S] tensor or a list of id lists."""
        if isinstance(batch, torch.Tensor):
            if batch.dim() != 2:
                raise ValueError(f"decode_batch expects a [B, S] tensor, got shape {tuple(batch.shape)}")
            batch = list(batch)
        rows = [self._as_ids(r, f"batch[{k}]") for k, r in enumerate(batch)]
        if skip_special_tokens:
            rows = [[i for i in r if i not in self.special_ids] for r in rows]
        return self._backend.decode_batch(rows)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        """A fresh incremental decoder for one generated sequence (see StreamDecoder)."""
        return StreamDecoder(self, skip_special_tokens)

    # ------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation of {"role": "system"|"user"|"assistant", "content": str} turns.

        Uses the checkpoint's jinja2 chat_template when it has one, else stablelm-zephyr-3b's format. The text
        already holds its special tokens: encode it with add_special_tokens=False unless a bos is wanted.
        """
        _check_messages(messages)
        if self.chat_template is None:
            if self.eos_token is None:
                raise ValueError("the zephyr chat format ends each turn with eos, but the tokenizer has no eos token")
            return _zephyr_chat(messages, add_generation_prompt, self.eos_token)
        if self._compiled_template is None:
            self._compiled_template = _compile_jinja(self.chat_template)
        return self._compiled_template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", pad_token=self.pad_token or "", unk_token=self.unk_token or "")


class StreamDecoder:
    """Turns ids arriving one at a time into text pieces whose concatenation equals `decode` of all ids.

    Each push decodes a short window that starts one emitted chunk back, so context-dependent decoding (the
    leading-space rule of sentencepiece, byte-level merges) sees its left neighbour. Text is held back while it
    ends in U+FFFD: a character split over several byte tokens is emitted once complete, never in pieces.
    `flush()` returns what is still held (also an unfinishable byte sequence, as decode would write it).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: the chunk emitted last is decoded again as context
        self._read = 0    # ids up to here are emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completed ("" while a character is still incomplete)."""
        self._ids.append(self._tok._check_id(token_id, "token id"))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return any held text and start over."""
        text = self._advance(final=True)
        self._ids, self._prefix, self._read = [], 0, 0
        return text

    def _advance(self, final: bool) -> str:
        decode = lambda ids: self._tok.decode(ids, skip_special_tokens=self._skip)  # noqa: E731
        before = decode(self._ids[self._prefix:self._read])
        now = decode(self._ids[self._prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""
