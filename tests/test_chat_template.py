"""Chat templates rendered as transformers' `apply_chat_template` renders them, read from a checkpoint directory.

The tokenizer directories are built here: a small GPT-NeoX-style byte-level BPE trained on generated text, saved
with tokenizer.json + tokenizer_config.json (+ chat_template.jinja) the way StableLM checkpoints ship them. Every
rendered string is compared byte for byte with `AutoTokenizer.from_pretrained(dir).apply_chat_template(...,
tokenize=False)` and the ids of the rendered prompt with transformers' ids. One test runs in a fresh interpreter
that never imports transformers: `--chat` used to crash there (jinja2.ext was only imported by transformers).
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from stablelm.tokenizer import ChatTemplateError, Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

EOS = "<|endoftext|>"
SPECIALS = [EOS, "<|padding|>", "<|system|>", "<|user|>", "<|assistant|>", "<|im_start|>", "<|im_end|>"]

# stablelm-zephyr-3b's template as its tokenizer_config.json holds it (the HuggingFaceH4 zephyr format).
ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# ChatML, the format of stablelm-2's chat models.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Exercises the environment: lstrip/trim of indented block tags, loop.last / loop.index, break/continue
# (loopcontrols), namespace(), raise_exception, tojson (non-ASCII, HTML characters, options), bos_token and
# `is defined` checks on tokens the config does not name, {% generation %}, tools and documents variables.
STRICT = """{{ bos_token }}
{% set ns = namespace(system='') %}
{% if messages[0]['role'] == 'system' %}
    {% set ns.system = messages[0]['content'] %}
    {% set messages = messages[1:] %}
{% endif %}
{% if ns.system %}[SYS {{ ns.system | tojson }}]
{% endif %}
{% if pad_token is defined %}pad={{ pad_token }}{% else %}no-pad{% endif %}|{{ tools is none }}|{{ documents is none }}
{% for message in messages %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('Unsupported role: ' + message['role']) }}
    {% endif %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['content'] == 'SKIP' %}{% continue %}{% endif %}
    {% if message['role'] == 'assistant' %}
<|assistant|>{% generation %}{{ message['content'] | trim }}{% endgeneration %}{{ eos_token }}
    {% else %}
<|user|>{{ message['content'] }}{% if loop.last %} (last){% endif %}
    {% endif %}
    {% if message['content'] == 'STOP' %}{% break %}{% endif %}
{% endfor %}
{{ messages | map(attribute='content') | list | tojson(indent=1, sort_keys=True) }}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "List 3 synonyms for the word \"tiny\""}],
    [{"role": "system", "content": "You are a radiologist. <b>&</b> ünïcödé 日本語 😀"},
     {"role": "user", "content": "Describe: café 😀\n\tindented  spaces  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello!\nHow can I help?  "},
     {"role": "user", "content": "SKIP"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "  spaces  and <|endoftext|> inside  "}],
    [{"role": "user", "content": "STOP"}, {"role": "assistant", "content": "never shown"}],
]


def _corpus(n=300, seed=0):
    rng = random.Random(seed)
    words = ["the", "heart", "size", "is", "normal", "lungs", "clear", "café", "日本語", "😀", "user", "assistant",
             "system", "radiologist", "Hello", "help", "{", "}", "[", "]", ":", "\"", "\n", "  "]
    return [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    tok = RustTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    path = tmp_path_factory.mktemp("chat") / "tokenizer.json"
    tok.save(str(path))
    return path


def _checkpoint(root: Path, tokenizer_json: Path, config: dict, files: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


ZEPHYR_CONFIG = {"tokenizer_class": "GPTNeoXTokenizer", "bos_token": EOS, "eos_token": EOS, "unk_token": EOS,
                 "add_prefix_space": False, "clean_up_tokenization_spaces": True}


def _compare(d: Path, conversations, template_name=None, **kwargs):
    """Render every conversation with ours and transformers; strings and ids must be identical."""
    from transformers import AutoTokenizer
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
    rendered = []
    for messages in conversations:
        for gen in (True, False):
            ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                         chat_template=template_name, **kwargs)
            text = ours.apply_chat_template(messages, add_generation_prompt=gen, chat_template=template_name,
                                            **kwargs)
            assert text == ref, (messages, gen)
            ids = ours.encode(text, add_special_tokens=False)
            ref_ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=gen,
                                             chat_template=template_name, **kwargs)
            assert ids == list(ref_ids), (messages, gen)
            rendered.append(text)
    return rendered


# ---------------------------------------------------------------- outside transformers' process
def test_renders_in_a_process_without_transformers(tokenizer_json, tmp_path):
    d = _checkpoint(tmp_path / "zephyr", tokenizer_json, ZEPHYR_CONFIG, {"chat_template.jinja": ZEPHYR})
    messages = CONVERSATIONS[1]
    code = (
        "import json, sys\n"
        "from stablelm.tokenizer import Tokenizer\n"
        f"tok = Tokenizer.from_dir({str(d)!r})\n"
        f"text = tok.apply_chat_template({messages!r})\n"
        "assert 'transformers' not in sys.modules, 'the test must run without transformers'\n"
        "print(json.dumps({'text': text, 'ids': tok.encode(text, add_special_tokens=False)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])

    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(d))
    ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got["text"] == ref == (f"<|system|>\n{messages[0]['content']}{EOS}\n<|user|>\n{messages[1]['content']}"
                                  f"{EOS}\n<|assistant|>\n")
    assert got["ids"] == hf(ref, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- in process, against transformers
def test_zephyr_template_from_jinja_file(tokenizer_json, tmp_path):
    d = _checkpoint(tmp_path / "zephyr", tokenizer_json, ZEPHYR_CONFIG, {"chat_template.jinja": ZEPHYR})
    texts = _compare(d, CONVERSATIONS)
    assert texts[0] == f"<|user|>\nList 3 synonyms for the word \"tiny\"{EOS}\n<|assistant|>\n"
    # without a template, the built-in format is zephyr's
    plain = _checkpoint(tmp_path / "plain", tokenizer_json, ZEPHYR_CONFIG)
    assert Tokenizer.from_dir(plain).chat_template is None
    assert Tokenizer.from_dir(plain).apply_chat_template(CONVERSATIONS[0]) == texts[0]


def test_templates_from_tokenizer_config(tokenizer_json, tmp_path):
    d = _checkpoint(tmp_path / "string", tokenizer_json, {**ZEPHYR_CONFIG, "chat_template": CHATML})
    texts = _compare(d, CONVERSATIONS)
    assert texts[0].startswith("<|im_start|>user\n") and texts[0].endswith("<|im_start|>assistant\n")
    named = [{"name": "default", "template": ZEPHYR}, {"name": "chatml", "template": CHATML},
             {"name": "tool_use", "template": "{{ tools | tojson }}{{ messages[0]['content'] }}"}]
    d = _checkpoint(tmp_path / "list", tokenizer_json, {**ZEPHYR_CONFIG, "chat_template": named})
    assert _compare(d, CONVERSATIONS[:2]) == _compare(tmp_path / "list", CONVERSATIONS[:2], "default")
    _compare(d, CONVERSATIONS[:2], "chatml")
    tools = [{"type": "function", "function": {"name": "measure", "description": "größe <mm>"}}]
    assert _compare(d, CONVERSATIONS[:1], tools=tools)[0].startswith('[{"type": "function"')
    # a list without "default" renders only by name; transformers fails the same way without one
    d = _checkpoint(tmp_path / "nodefault", tokenizer_json, {**ZEPHYR_CONFIG, "chat_template": named[1:]})
    _compare(d, CONVERSATIONS[:1], "chatml")
    with pytest.raises(ChatTemplateError, match="no 'default'"):
        Tokenizer.from_dir(d).apply_chat_template(CONVERSATIONS[0])


def test_jinja_files_take_priority(tokenizer_json, tmp_path):
    d = _checkpoint(tmp_path / "both", tokenizer_json, {**ZEPHYR_CONFIG, "chat_template": CHATML},
                    {"chat_template.jinja": ZEPHYR, "additional_chat_templates/chatml.jinja": CHATML})
    assert _compare(d, CONVERSATIONS[:2])[0].startswith("<|user|>")
    assert _compare(d, CONVERSATIONS[:2], "chatml")[0].startswith("<|im_start|>")


def test_environment_features_match(tokenizer_json, tmp_path):
    d = _checkpoint(tmp_path / "strict", tokenizer_json, {**ZEPHYR_CONFIG, "chat_template": STRICT})
    texts = _compare(d, CONVERSATIONS)  # two renders (with / without generation prompt) per conversation
    third = texts[4]
    assert third.count("<|assistant|>") == 3 and "<|user|>SKIP" not in third and "(last)" in third
    assert "<|assistant|>Hello!\nHow can I help?" + EOS in third  # {% generation %} body, trimmed
    assert "<|assistant|>never shown" not in texts[6] and "STOP" in texts[6]  # {% break %} stopped the loop
    assert '[SYS "You are a radiologist. <b>&</b> ünïcödé 日本語 😀"]' in texts[2]  # tojson: no escaping
    # a GPTNeoXTokenizer config without pad_token gets the class default, in transformers and here
    assert texts[0].startswith(EOS + "\npad=<|padding|>|True|True\n<|user|>")
    # no tokenizer_class: bos_token undefined, pad only as named; the variables follow the config
    d = _checkpoint(tmp_path / "nobos", tokenizer_json, {"eos_token": EOS, "chat_template": STRICT})
    assert _compare(d, CONVERSATIONS[:1])[0].startswith("\nno-pad|")
    d = _checkpoint(tmp_path / "pad", tokenizer_json, {"eos_token": EOS, "pad_token": "<|im_end|>",
                                                       "chat_template": STRICT})
    assert _compare(d, CONVERSATIONS[:1])[0].startswith("\npad=<|im_end|>|")
    documents = [{"title": "t", "text": "x"}]
    _compare(d, CONVERSATIONS[:1], documents=documents, extra_variable="not used")


def test_strftime_now_and_template_kwargs(tokenizer_json, tmp_path):
    template = "{{ strftime_now('%Y') }}|{{ custom }}|{{ messages[0]['content'] }}"
    d = _checkpoint(tmp_path / "kw", tokenizer_json, {**ZEPHYR_CONFIG, "chat_template": template})
    assert _compare(d, CONVERSATIONS[:1], custom="value")[0].split("|")[1] == "value"


@pytest.mark.parametrize("messages,match", [
    ([{"role": "tool", "content": "x"}], "Unsupported role: tool"),
    ([{"role": "assistant", "content": "x"}], "roles must alternate"),
])
def test_raise_exception_matches_transformers(tokenizer_json, tmp_path, messages, match):
    import jinja2
    from transformers import AutoTokenizer
    d = _checkpoint(tmp_path / "strict", tokenizer_json, {**ZEPHYR_CONFIG, "chat_template": STRICT})
    with pytest.raises(jinja2.TemplateError, match=match):
        AutoTokenizer.from_pretrained(str(d)).apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatTemplateError, match=match):
        Tokenizer.from_dir(d).apply_chat_template(messages)


def test_template_file_errors_name_the_file(tokenizer_json, tmp_path):
    d = _checkpoint(tmp_path / "badjinja", tokenizer_json, ZEPHYR_CONFIG)
    (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ValueError, match="chat_template.jinja: not UTF-8"):
        Tokenizer.from_dir(d)
    d = _checkpoint(tmp_path / "badtype", tokenizer_json, {**ZEPHYR_CONFIG, "chat_template": 3})
    with pytest.raises(ValueError, match="tokenizer_config.json: chat_template must be"):
        Tokenizer.from_dir(d)
    d = _checkpoint(tmp_path / "badlist", tokenizer_json, {**ZEPHYR_CONFIG, "chat_template": [{"name": "x"}]})
    with pytest.raises(ValueError, match="tokenizer_config.json: chat_template: a list"):
        Tokenizer.from_dir(d)
    d = _checkpoint(tmp_path / "syntax", tokenizer_json, ZEPHYR_CONFIG, {"chat_template.jinja": "{% for m in x %}"})
    with pytest.raises(ChatTemplateError, match="not a valid jinja2 template"):
        Tokenizer.from_dir(d).apply_chat_template(CONVERSATIONS[0])
