"""Text <-> token ids for StableLM checkpoints, without importing transformers at run time.

Two backends behind one `Tokenizer`:
- `tokenizer.json` through the `tokenizers` library (every public StableLM checkpoint: GPT-NeoX BPE for
  stablelm-3b-4e1t / zephyr / stable-code, the tiktoken-converted Arcade100k BPE for stablelm-2);
- `tokenizer.model` through sentencepiece.
`tokenizer_config.json` / `special_tokens_map.json` name the bos/eos/pad/unk tokens, extra special tokens, the
chat template (also read from `chat_template.jinja`) and, for sentencepiece, the add_bos/add_eos flags;
`generation_config.json` / `config.json` fill a missing bos/eos and add further stop ids (`eos_ids`).
Behaviour follows transformers' fast tokenizers: ids from `encode` match `PreTrainedTokenizerFast`, batches are
left padded for generation, and the chat template is rendered with the same jinja2 settings and variables.
Ids past the vocabulary (StableLM embeddings are padded to 50304 rows; the tokenizer has ~50280 ids) decode to
nothing, as `tokenizers` and transformers decode them.

Every malformed file raises `TokenizerFileError` (a ValueError) naming the file.
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
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named tokens a chat template sees as variables.
_NAMED_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Defaults transformers 5's tokenizer classes give tokens a tokenizer_config.json leaves out (their __init__
# signatures); stablelm-3b-4e1t / zephyr name GPTNeoXTokenizer, stablelm-2 GPT2TokenizerFast.
_CLASS_DEFAULTS = {
    "GPTNeoXTokenizer": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                         "pad_token": "<|padding|>"},
    "GPT2Tokenizer": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class TokenizerFileError(ValueError):
    """A tokenizer file (tokenizer.json, tokenizer.model, tokenizer_config.json, ...) that cannot be used."""

    def __init__(self, path, message: str):
        self.path = Path(path)
        super().__init__(f"{path}: {message}")


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that called raise_exception() while rendering."""


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
        # transformers skips clean_up_tokenization_spaces for BPE models (it would eat spaces before punctuation).
        self.cleans_up = type(tok.model).__name__ != "BPE"
        # One past the largest id, not the token count: a converted vocabulary (tiktoken's) may have holes.
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @classmethod
    def load(cls, path: Path):
        from tokenizers import Tokenizer as RustTokenizer
        try:
            return cls(RustTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise TokenizerFileError(path, f"cannot load as a tokenizers tokenizer.json: {e}") from None

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
        if i is None:
            raise ValueError(f"special token {token!r} cannot be added to the vocabulary")
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
        self.cleans_up = False  # StableLM uses no sentencepiece model; clean-up is not applied to one

    @classmethod
    def load(cls, path: Path):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerFileError(path, f"cannot load as a sentencepiece model: {e}") from None
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
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise TokenizerFileError(path, f"not valid JSON: {e}") from None
    except OSError as e:
        raise TokenizerFileError(path, f"cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerFileError(path, f"must hold a JSON object, got {type(data).__name__}")
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(path, f"not UTF-8 text: {e}") from None
    except OSError as e:
        raise TokenizerFileError(path, f"cannot be read: {e}") from None


def _token_text(value, path: Path, key: str) -> str | None:
    """A special token as written in a config: a string, an AddedToken dict ({"content": ...}) or null."""
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        value = value["content"]
    if value == "":
        raise TokenizerFileError(path, f"{key}: a special token cannot be the empty string")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerFileError(path, f"{key}: expected a token string or {{'content': str}}, got {value!r}")


def _id_list(value, path: Path, key: str) -> list[int]:
    if value is None:
        return []
    values = [value] if not isinstance(value, list) else value
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerFileError(path, f"{key}: expected a token id or a list of token ids, got {value!r}")
    return values


def _flag(config: dict, key: str, path: Path, default: bool | None) -> bool | None:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TokenizerFileError(path, f"{key}: expected true or false, got {value!r}")
    return value


def _chat_templates(d: Path, config: dict) -> str | dict[str, str] | None:
    """The checkpoint's chat template(s), found where transformers 5 looks.

    chat_template.jinja (the "default" template) and additional_chat_templates/NAME.jinja take priority over
    tokenizer_config.json's chat_template, which is a string or a list of {"name", "template"} entries. One
    default template comes back as a string, several as {name: template}.
    """
    templates = {}
    if (d / "chat_template.jinja").is_file():
        templates["default"] = _read_text(d / "chat_template.jinja")
    extra = d / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = _read_text(f)
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    where = d / "tokenizer_config.json"
    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            raise TokenizerFileError(where, "chat_template: a list must hold {'name': str, 'template': str} entries")
        return {t["name"]: t["template"] for t in template}
    if template is not None and not isinstance(template, str):
        raise TokenizerFileError(where, f"chat_template must be a string or a list, got {type(template).__name__}")
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
        import jinja2.ext  # not imported by `import jinja2`; transformers' import used to hide that
        import jinja2.nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("rendering a checkpoint's chat_template needs jinja2 >= 3.1 (pip install jinja2)") from e

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): renders its body as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise ChatTemplateError(f"chat template error: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters and ASCII-escapes text; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat_template is not a valid jinja2 template (line {e.lineno}): {e.message}") \
            from None


def _check_messages(messages, strict: bool) -> None:
    """A conversation must be a non-empty list of dicts with a "role". The built-in format (strict) also needs
    known roles and str content; a jinja template decides for itself what it accepts (it may raise_exception)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"messages[{k}] must be a dict, got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"messages[{k}] has no 'role'")
        if not strict:
            continue
        if m.get("role") not in CHAT_ROLES:
            raise ValueError(f"messages[{k}] has role {m.get('role')!r}; expected one of {CHAT_ROLES}")
        if not isinstance(m.get("content"), str):
            raise TypeError(f"messages[{k}]['content'] must be a str, got {type(m.get('content')).__name__}")


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: drop the space a word-piece detokeniser leaves before punctuation."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


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
                 add_bos: bool | None = None, add_eos: bool | None = None,
                 chat_template: str | dict[str, str] | None = None, extra_eos_ids=(),
                 template_tokens: dict[str, str] | None = None, clean_up_tokenization_spaces: bool = False,
                 clean_up_bpe: bool = False):
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
        if isinstance(chat_template, dict) and not all(
                isinstance(k, str) and isinstance(v, str) for k, v in chat_template.items()):
            raise TypeError("chat_template must be a str or a dict of {name: template str}")
        if chat_template is not None and not isinstance(chat_template, (str, dict)):
            raise TypeError(f"chat_template must be a str or a dict, got {type(chat_template).__name__}")
        self.chat_template = chat_template
        self._compiled_templates = {}
        # The variables a chat template sees: the named special tokens transformers would know (not the ones
        # filled in here from config.json / generation_config.json ids, which transformers does not read).
        if template_tokens is None:
            template_tokens = {k: v for k, v in zip(_TOKEN_KEYS, (bos_token, eos_token, pad_token, unk_token))
                               if v is not None}
        self.template_tokens = dict(template_tokens)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._clean_up_bpe = clean_up_bpe

    # ------------------------------------------------ construction
    @classmethod
    def from_file(cls, path, *, bos_token: str | None = None, eos_token: str | None = None,
                  pad_token: str | None = None, unk_token: str | None = None, add_bos: bool | None = None,
                  add_eos: bool | None = None, chat_template: str | None = None) -> "Tokenizer":
        """A tokenizer.json or tokenizer.model alone; special tokens are named by the arguments.

        A sentencepiece model already knows its bos/eos/unk/pad pieces; they are used where not given.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        backend = _load_backend(path)
        given = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        tokens = {k: v if v is not None else backend.own_tokens().get(k) for k, v in given.items()}
        return cls(backend, **tokens, add_bos=add_bos, add_eos=add_eos, chat_template=chat_template)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """A checkpoint directory: tokenizer.json (preferred) or tokenizer.model, plus the optional configs.

        Read as transformers' `AutoTokenizer.from_pretrained` reads it: special tokens from tokenizer_config.json
        (special_tokens_map.json where the config has no added_tokens_decoder), the defaults of the named
        tokenizer_class, the chat template(s), clean_up_tokenization_spaces.
        """
        d = Path(path).expanduser()
        looked_for = " or ".join(TOKENIZER_FILES)
        if not d.exists():
            raise FileNotFoundError(f"directory {d} does not exist (looked for {looked_for} in it)")
        if not d.is_dir():
            raise NotADirectoryError(f"{d} is not a directory (expected a checkpoint directory holding {looked_for})")
        file = next((d / n for n in TOKENIZER_FILES if (d / n).is_file()), None)
        if file is None:
            raise FileNotFoundError(f"{d} has no {looked_for} (found: "
                                    f"{', '.join(sorted(p.name for p in d.iterdir())) or 'nothing'})")
        config_path, map_path = d / "tokenizer_config.json", d / "special_tokens_map.json"
        config = _read_json(config_path)
        # As in transformers: special_tokens_map.json is the older format, read (and winning) only when
        # tokenizer_config.json has no added_tokens_decoder.
        special_map = {} if "added_tokens_decoder" in config else _read_json(map_path)
        merged = {**config, **special_map}
        named = {}
        for key in _NAMED_TOKEN_KEYS:
            if key in merged:
                named[key] = _token_text(merged[key], map_path if key in special_map else config_path, key)
        class_name = config.get("tokenizer_class")
        if isinstance(class_name, str):
            for key, token in _CLASS_DEFAULTS.get(class_name.removesuffix("Fast"), {}).items():
                named.setdefault(key, token)  # an explicit null in the config stays null
        extra = []
        for source, where in ((config, config_path), (special_map, map_path)):
            for key in ("additional_special_tokens", "extra_special_tokens"):
                values = source.get(key) or []
                if isinstance(values, dict):  # model-specific named tokens ({"image_token": "<image>"})
                    for name, v in values.items():
                        named.setdefault(str(name), _token_text(v, where, f"{key}.{name}"))
                        extra.append(named[str(name)])
                elif isinstance(values, list):
                    extra += [_token_text(v, where, key) for v in values]
                else:
                    raise TokenizerFileError(where, f"{key}: expected a list of tokens, got {values!r}")
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise TokenizerFileError(config_path, "added_tokens_decoder must be an object of {id: token}")
        for i, entry in decoder.items():
            if isinstance(entry, dict) and entry.get("special"):
                extra.append(_token_text(entry, config_path, f"added_tokens_decoder[{i}]"))
        named = {k: v for k, v in named.items() if v is not None}
        tokens = {k: named.get(k) for k in _TOKEN_KEYS}

        # Token ids from the model/generation configs fill missing bos/eos and add further stop ids.
        model_path, generation_path = d / "config.json", d / "generation_config.json"
        model_config = _read_json(model_path)
        if isinstance(model_config.get("config"), dict):  # this project's converted format nests the fields
            model_config = model_config["config"]
        generation = _read_json(generation_path)
        backend = _load_backend(file)
        for key, token in backend.own_tokens().items():
            if tokens[key] is None:
                tokens[key] = token
        ids_of = {}
        for key in ("bos_token_id", "eos_token_id"):
            ids_of[key] = (_id_list(generation.get(key), generation_path, key),
                           _id_list(model_config.get(key), model_path, key))
        for key in ("bos_token", "eos_token"):
            ids = ids_of[key + "_id"][0] or ids_of[key + "_id"][1]
            if tokens[key] is None and ids and 0 <= ids[0] < backend.vocab_size:
                tokens[key] = backend.id_to_token(ids[0])
        flags = {} if isinstance(backend, _TokenizersBackend) else {
            "add_bos": _flag(config, "add_bos_token", config_path, None),
            "add_eos": _flag(config, "add_eos_token", config_path, None)}
        tok = cls(backend, **tokens, extra_special_tokens=extra, **flags, chat_template=_chat_templates(d, config),
                  template_tokens=named,
                  clean_up_tokenization_spaces=_flag(config, "clean_up_tokenization_spaces", config_path, False),
                  clean_up_bpe=_flag(config, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                                     config_path, False))
        stops = list(tok.eos_ids)
        for ids, where in zip(ids_of["eos_token_id"], (generation_path, model_path)):
            for i in ids:
                if not 0 <= i < tok.vocab_size:
                    raise TokenizerFileError(where, f"eos_token_id {i} is outside the vocabulary [0, {tok.vocab_size})")
                stops.append(i)
        tok.eos_ids = tuple(dict.fromkeys(stops))
        return tok

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
    def _decode_id(self, i, what: str) -> int:
        try:
            i = operator.index(i)  # ints, numpy integers, 0-d integer tensors
        except TypeError:
            raise TypeError(f"{what} must be an integer, got {type(i).__name__}") from None
        if i < 0:
            raise ValueError(f"{what} {i} is negative")
        return i

    def _as_ids(self, ids, what: str, skip_special_tokens: bool) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex:
                raise ValueError(f"{what} must be a 1-D integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
            ids = ids.tolist()
        ids = [self._decode_id(i, f"{what} entry") for i in ids]
        # Ids past the vocabulary (a padded embedding's extra rows) have no text: `tokenizers` skips them when
        # decoding, and so does transformers; ids in a hole of the vocabulary are skipped by `tokenizers` too.
        n = self.vocab_size
        if skip_special_tokens:
            return [i for i in ids if i < n and i not in self.special_ids]
        return [i for i in ids if i < n]

    def _clean(self, text: str, clean_up_tokenization_spaces: bool | None) -> str:
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        # As transformers 5: the clean-up is never applied to a BPE model unless forced by the config.
        if clean and (self._backend.cleans_up or self._clean_up_bpe):
            return _clean_up_tokenization(text)
        return text

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of a sequence of ids (list or 1-D tensor); special tokens are dropped unless asked for.

        Ids at or past `vocab_size` decode to nothing (transformers does the same); negative ids are an error.
        """
        ids = self._as_ids(ids, "ids", skip_special_tokens)
        return self._clean(self._backend.decode(ids), clean_up_tokenization_spaces)

    def decode_batch(self, batch, skip_special_tokens: bool = True,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """decode for every row of a [B, S] tensor or a list of id lists."""
        if isinstance(batch, torch.Tensor):
            if batch.dim() != 2:
                raise ValueError(f"decode_batch expects a [B, S] tensor, got shape {tuple(batch.shape)}")
            batch = list(batch)
        rows = [self._as_ids(r, f"batch[{k}]", skip_special_tokens) for k, r in enumerate(batch)]
        return [self._clean(t, clean_up_tokenization_spaces) for t in self._backend.decode_batch(rows)]

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        """A fresh incremental decoder for one generated sequence (see StreamDecoder)."""
        return StreamDecoder(self, skip_special_tokens)

    # ------------------------------------------------ chat
    def _template_source(self, chat_template: str | None, tools) -> str | None:
        """transformers' get_chat_template: a name picks one of several templates; "tool_use" serves tools."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None:
                return own.get(chat_template, chat_template)
            if tools is not None and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
            raise ChatTemplateError(f"the tokenizer has several chat templates ({', '.join(sorted(own))}) and no "
                                    "'default': pass chat_template=NAME")
        return chat_template if chat_template is not None else own

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            chat_template: str | None = None, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, **template_kwargs) -> str:
        """The prompt text for a conversation of {"role": ..., "content": ...} turns.

        Renders the checkpoint's jinja2 chat_template exactly as transformers' `apply_chat_template(messages,
        tokenize=False, ...)` does: same jinja environment, variables `messages`, `tools`, `documents`,
        `add_generation_prompt`, the named special tokens (bos_token, eos_token, ...) and `template_kwargs`.
        Unlike transformers, add_generation_prompt defaults to True (this is for prompting a model).
        `chat_template` is a template name (of several) or a template's source. Without any template,
        stablelm-zephyr-3b's format is used. The text already holds its special tokens: encode it with
        add_special_tokens=False unless a bos is wanted.
        """
        source = self._template_source(chat_template, tools)
        _check_messages(messages, strict=source is None)
        if source is None:
            if self.eos_token is None:
                raise ValueError("the zephyr chat format ends each turn with eos, but the tokenizer has no eos token")
            return _zephyr_chat(messages, add_generation_prompt, self.eos_token)
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise TypeError("tools must be a list of JSON-schema dicts")
        if documents is not None and not all(isinstance(doc, dict) for doc in documents):
            raise TypeError("documents must be a list of dicts")
        compiled = self._compiled_templates.get(source)
        if compiled is None:
            compiled = self._compiled_templates[source] = _compile_jinja(source)
        variables = {**self.template_tokens, **template_kwargs}
        return compiled.render(messages=messages, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)


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
        self._ids.append(self._tok._decode_id(token_id, "token id"))
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
