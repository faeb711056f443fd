"""What a user sees when something is wrong, run as a user runs it (`python -m stablelm ...`, convert_weights.py,
`python -m stablelm.classify` in subprocesses): `error: ...` and exit 2, never a traceback; NaN/inf weights and
logits, a missing model directory, --device cuda without CUDA; `~` in every path; greedy unless sampling is asked
for; human parameter counts (quantized layers counted as the weights they stand for); a closed stdout; --help."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import stablelm
from hf_utils import hf_model
from stablelm.checkpoint import convert_hf_dir
from stablelm.convert import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["the cat sat on the mat", "a dog ran in the park", "no acute findings in the lungs"] * 20
EXTRA_ROWS = 8  # the model's embedding is larger than the tokenizer's vocabulary, as in real StableLM checkpoints


def run(*args, home=None, script=None, stdin_closed=False):
    """`python -m stablelm ARGS` (or `python SCRIPT ARGS`, or `python -m MODULE` for script="-m MODULE")."""
    cmd = [sys.executable, *(script.split() if script else ["-m", "stablelm"]), *map(str, args)]
    env = dict(os.environ, HOME=str(home)) if home is not None else None
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "error: " in r.stderr and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


def rewrite_tensors(ckpt: Path, change) -> None:
    """Change model.safetensors' tensors in place, keeping its metadata (so the layout check still passes)."""
    f = ckpt / "model.safetensors"
    with safe_open(str(f), framework="pt") as st:
        metadata = st.metadata()
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    change(tensors)
    save_file(tensors, str(f), metadata=metadata)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A home directory holding an HF checkpoint `hf` (with a trained BPE tokenizer), its conversion `conv`, an
    int8 conversion `int8`, and `past_vocab`: a conversion whose greedy choice is always an id past the
    tokenizer's vocabulary."""
    home = tmp_path_factory.mktemp("home")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab_size()
    src = home / "hf"
    hf_model(vocab_size=vocab + EXTRA_ROWS, bos_token_id=0, eos_token_id=0).save_pretrained(src)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    convert_hf_dir(src, home / "conv")
    convert_hf_dir(src, home / "int8", quant="int8")
    convert_hf_dir(src, home / "past_vocab")

    def always_past_vocab(t):
        # final norm: weight 0, bias b -> every position's hidden state is b; only row vocab+3 of lm_head is b.
        t["norm.weight"].zero_()
        t["norm.bias"].copy_(torch.linspace(-1, 1, t["norm.bias"].numel()))
        t["lm_head.weight"].zero_()
        t["lm_head.weight"][vocab + 3] = t["norm.bias"]

    rewrite_tensors(home / "past_vocab", always_past_vocab)
    (home / "data.jsonl").write_text("".join(json.dumps({"text": t, "label": t.split()[0]}) + "\n"
                                             for t in CORPUS[:6]))
    return home


# ---------------------------------------------------------------- load: NaN / inf
@pytest.fixture(scope="module")
def nan_ckpt(home, tmp_path_factory):
    path = tmp_path_factory.mktemp("nan") / "conv"
    convert_hf_dir(home / "hf", path)

    def poison(t):
        t["layers.1.mlp.down.weight"][3, 5] = float("nan")
        t["layers.0.attn.o.weight"][0, 0] = float("inf")

    rewrite_tensors(path, poison)
    return path


def test_load_refuses_non_finite_weights_naming_tensor_and_file(nan_ckpt, home, tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor layers\.0\.attn\.o\.weight holds "
                                              r"non-finite values \(0 NaN, 1 inf"):
        stablelm.load(nan_ckpt)
    model = stablelm.load(nan_ckpt, check_finite=False)  # the opt-out loads them as they are
    assert torch.isnan(model.layers[1].mlp.down.weight).any()
    # A Hugging Face shard is named too (the original tensor name, in its file).
    hf = tmp_path / "hf"
    hf_model(vocab_size=96).save_pretrained(hf)
    f = hf / "model.safetensors"
    with safe_open(str(f), framework="pt") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"hf/model\.safetensors: tensor model\.layers\.1\.self_attn\.q_proj"):
        stablelm.load(hf)


def test_load_refuses_a_cast_that_overflows(home, tmp_path):
    path = tmp_path / "big"
    convert_hf_dir(home / "hf", path)
    rewrite_tensors(path, lambda t: t["layers.0.mlp.gate_up.weight"].__setitem__((0, 0), 1e6))
    assert stablelm.load(path).layers[0].mlp.gate_up.weight[0, 0] == 1e6  # fine as stored (fp32)
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.gate_up\.weight .* past torch\.float16"):
        stablelm.load(path, dtype="fp16")


def test_cli_non_finite_weights_and_logits_are_user_errors(nan_ckpt):
    r = run("generate", "--model", nan_ckpt, "--prompt", "the cat", "--device", "cpu", "--max-new-tokens", "4")
    assert_user_error(r, "layers.0.attn.o.weight", "model.safetensors", "--no-check-finite")
    # Skipping the check, the NaN reaches the logits: generation stops with a clear error, not an empty line.
    r = run("generate", "--model", nan_ckpt, "--prompt", "the cat", "--device", "cpu", "--max-new-tokens", "4",
            "--no-check-finite")
    assert_user_error(r, "non-finite")


# ---------------------------------------------------------------- the model directory, the device
def test_missing_model_directory_is_named_as_such(home, tmp_path):
    r = run("generate", "--model", tmp_path / "nowhere", "--prompt", "hi")
    assert_user_error(r, f"model directory {tmp_path / 'nowhere'} does not exist")
    assert "tokenizer" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = run("generate", "--model", tmp_path / "empty", "--prompt", "hi")
    assert_user_error(r, "is not a model directory", "config.json")
    r = run("info", "--model", tmp_path / "nowhere")
    assert_user_error(r, "does not exist")


def test_cuda_without_cuda_is_a_clear_error(home):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run("generate", "--model", home / "conv", "--prompt", "hi", "--device", "cuda")
    assert_user_error(r, "--device cuda", "use --device cpu")
    assert "AssertionError" not in r.stderr
    assert_user_error(run("generate", "--prompt", "hi", "--device", "gpu0"), "--device 'gpu0'")


# ---------------------------------------------------------------- ~ in paths
def test_tilde_is_expanded_everywhere(home):
    r = run("generate", "--model", "~/conv", "--prompt", "the cat", "--device", "cpu", "--max-new-tokens", "3",
            home=home)
    assert r.returncode == 0, r.stderr
    r = run("info", "--model=~/int8", home=home)
    assert r.returncode == 0 and "int8" in r.stdout, r.stderr
    r = run("convert", "~/hf", "~/out1", home=home)
    assert r.returncode == 0 and (home / "out1" / "model.safetensors").is_file(), r.stderr
    r = run("~/hf", "~/out2", "--quant", "int8", home=home, script="convert_weights.py")
    assert r.returncode == 0 and (home / "out2" / "model.safetensors").is_file(), r.stderr
    assert not (ROOT / "~").exists()
    r = run("train", "--model", "~/conv", "--data", "~/data.jsonl", "--out", "~/cls", "--mode", "head",
            "--epochs", "1", "--batch-size", "6", "--device", "cpu", "--tokenizer", "~/hf", home=home,
            script="-m stablelm.classify")
    assert r.returncode == 0, r.stderr
    assert (home / "cls" / "tokenizer.json").is_file()
    r = run("evaluate", "--model", "~/cls", "--data", "~/data.jsonl", "--device", "cpu", home=home,
            script="-m stablelm.classify")
    assert r.returncode == 0 and "accuracy" in r.stdout, r.stderr


def test_tilde_in_the_api(home, monkeypatch):
    monkeypatch.setenv("HOME", str(home))
    assert isinstance(stablelm.load("~/conv"), stablelm.StableLM)
    assert stablelm.Tokenizer.from_dir("~/conv").vocab_size > 0
    assert stablelm.Tokenizer.from_file("~/conv/tokenizer.json").vocab_size > 0


# ---------------------------------------------------------------- sampling flags
def test_top_k_zero_does_not_switch_sampling_on(home):
    base = ["generate", "--model", home / "conv", "--prompt", "the cat", "--device", "cpu", "--max-new-tokens", "8"]
    greedy = run(*base)
    assert greedy.returncode == 0, greedy.stderr
    for flags in (["--top-k", "0"], ["--top-k", "0", "--top-p", "1.0", "--seed", "3"], ["--temperature", "0"]):
        r = run(*base, *flags)
        assert r.returncode == 0 and r.stdout == greedy.stdout, (flags, r.stderr)
    # A filter that would change anything needs sampling to be asked for; it is not silently ignored either.
    assert_user_error(run(*base, "--top-k", "5"), "--top-k is only used when sampling", "--do-sample")
    assert_user_error(run(*base, "--top-p", "0.5"), "--top-p is only used when sampling")
    assert_user_error(run(*base, "--do-sample", "--temperature", "0"), "greedy")


def test_sampling_rule_in_process(home):
    from stablelm.cli import DEFAULT_TOP_K, _sampling_options, build_parser
    parser = build_parser()

    def options(*flags):
        return _sampling_options(parser.parse_args(["generate", "--prompt", "x", *flags]), parser)

    assert options() == {"do_sample": False}
    assert options("--top-k", "0") == {"do_sample": False}
    assert options("--do-sample") == {"do_sample": True, "temperature": 1.0, "top_k": DEFAULT_TOP_K, "top_p": 1.0,
                                      "seed": None}
    assert options("--temperature", "0.7", "--top-k", "0")["top_k"] == 0  # 0 = no top-k filter while sampling
    assert options("--temperature", "0.7", "--top-k", "7", "--seed", "2")["top_k"] == 7
    assert DEFAULT_TOP_K == 50


# ---------------------------------------------------------------- parameter counts, streaming past the vocabulary
def test_parameter_counts_are_logical_and_human(home):
    float_model, int8_model = stablelm.load(home / "conv"), stablelm.load(home / "int8")
    n = float_model.num_params()
    assert int8_model.num_params() == n  # QuantLinear counts the float weight it stands for
    r = run("info", "--model", home / "int8")
    assert r.returncode == 0 and f"parameters: {n:,} ({n / 1e3:.1f}K)" in r.stdout, r.stdout
    for ckpt in ("conv", "int8"):
        r = run("generate", "--model", home / ckpt, "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2")
        assert r.returncode == 0 and f"loaded {n / 1e3:.1f}K parameters" in r.stderr, r.stderr
    from stablelm.cli import human_count
    assert [human_count(k) for k in (999, 136_448, 3_700_000, 2_795_443_200)] == ["999", "136.4K", "3.7M", "2.8B"]


def test_ids_past_the_vocabulary_stream_as_nothing(home):
    r = run("generate", "--model", home / "past_vocab", "--prompt", "the cat", "--device", "cpu",
            "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "\n" and "5 tokens" in r.stderr, (r.stdout, r.stderr)  # as decode() gives them: no text


# ---------------------------------------------------------------- a closed stdout, --help
def test_closed_stdout_ends_quietly(home):
    for args in (["info", "--model", home / "conv"],
                 ["generate", "--model", home / "conv", "--prompt", "the cat", "--device", "cpu",
                  "--max-new-tokens", "8"]):
        p = subprocess.Popen([sys.executable, "-m", "stablelm", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        p.stdout.close()  # the reader is gone before the first line is written, as `| head -0`
        err = p.stderr.read()
        assert p.wait(timeout=240) == 141, err
        assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("command", ["generate", "convert", "info", "check-op"])
def test_help_names_the_command_and_shows_defaults(command):
    r = run(command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: python -m stablelm {command} ") and "__main__" not in r.stdout
    text = " ".join(r.stdout.split())  # as wrapped to the terminal's width
    if command == "generate":
        for default in ("(default: 128)", "(default: 1.0)", "(default: 50, as transformers)", "(default: 1)"):
            assert default in text, default
        assert "--do-sample" in text and "--no-check-finite" in text
    if command == "convert":
        assert "(default: as stored in SRC)" in text


@pytest.mark.parametrize("flags", [["--quant", "int8"], ["--quantize-head"], ["--quantize-embedding"], ["--to-hf"]])
def test_vision_conversion_refuses_language_model_options(tmp_path, flags):
    # A Swin encoder has no quantized format, head or embedding table: an option meant for the LM is not ignored.
    src = tmp_path / "swin"
    src.mkdir()
    (src / "config.json").write_text("{}")
    r = run(src, tmp_path / "out", "--vision", *flags, script="convert_weights.py")
    assert_user_error(r, "--vision converts a Swin checkpoint to the project format only")
    assert not (tmp_path / "out").exists()


def test_convert_weights_help_shows_defaults():
    r = run("--help", script="convert_weights.py")
    assert r.returncode == 0 and r.stdout.startswith("usage: convert_weights.py ")
    text = " ".join(r.stdout.split())
    assert "(default: as stored in SRC)" in text and "(default: none)" in text
    top = run("--help")
    assert top.stdout.startswith("usage: python -m stablelm ") and "greedy unless --do-sample" in top.stdout


@pytest.mark.parametrize("module, args, default", [
    ("vision.metrics", [], "(default: auto)"),
    ("vision.synthetic", [], "(default: 300)"),
    ("stablelm.classify", ["train"], "(default: 512)"),
])
def test_other_commands_help_names_the_module_and_shows_defaults(module, args, default):
    r = subprocess.run([sys.executable, "-m", module, *args, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: python -m {module}") and "__main__" not in r.stdout
    assert default in " ".join(r.stdout.split()), r.stdout
