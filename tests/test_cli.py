"""`python -m stablelm`: generate with the tiny random default and with a converted checkpoint + a BPE tokenizer
trained here, convert and info. Two runs go through a real subprocess; the rest call cli.main in process."""
import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import stablelm
from hf_utils import hf_model
from stablelm.cli import main
from stablelm.generate import generate
from stablelm.tokenizer import Tokenizer

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "the report shows a clear chest",
          "no acute findings in the lungs", "heart size is normal"] * 20
PROMPT = "the cat"


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stablelm", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A converted random-weight checkpoint whose vocabulary is a byte-level BPE trained on CORPUS."""
    tmp = tmp_path_factory.mktemp("cli")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    src = tmp / "hf"
    hf_model(vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=0).save_pretrained(src)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>",
                                                           "eos_token": "<|endoftext|>"}))
    assert main(["convert", str(src), str(tmp / "converted")]) == 0  # the convert subcommand
    return tmp / "converted"


def expected_text(ckpt, ids, **kw) -> str:
    """What the CLI must print: the decoded new tokens up to the first stop id, as a CPU fp32 run gives them."""
    tokenizer = Tokenizer.from_dir(ckpt)
    out = generate(stablelm.load(ckpt), torch.tensor([ids]), stop_ids=tokenizer.eos_ids, **kw)[0].tolist()
    stop = next((k for k, i in enumerate(out) if i in tokenizer.eos_ids), len(out))
    return tokenizer.decode(out[:stop])


def test_tiny_default_runs_anywhere(tmp_path):
    r = run_cli("generate", "--prompt", "hi", "--max-new-tokens", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr and "tokens/s" in r.stderr
    assert r.stdout.endswith("\n")


def test_checkpoint_with_trained_tokenizer_runs(checkpoint, tmp_path):
    r = run_cli("generate", "--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "6",
                "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "RANDOM" not in r.stderr and "tokens/s" in r.stderr
    assert r.stdout == expected_text(checkpoint, Tokenizer.from_dir(checkpoint).encode(PROMPT),
                                     max_new_tokens=6) + "\n"


@pytest.mark.parametrize("flags,kw", [
    ([], dict()),
    (["--num-beams", "3", "--length-penalty", "0.5", "--no-cuda-graph"],
     dict(num_beams=3, length_penalty=0.5, cuda_graph=False)),
    # A penalty below 1 (rewarding repeats) is one that changes this random model's greedy text.
    (["--repetition-penalty", "0.6", "--min-new-tokens", "3"], dict(repetition_penalty=0.6, min_new_tokens=3)),
    (["--temperature", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "5"],
     dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=5)),
], ids=["greedy", "beams", "penalties", "sampling"])
def test_generate_prints_the_decoded_tokens(checkpoint, capsys, flags, kw):
    argv = ["generate", "--model", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12", "--device", "cpu"]
    assert main(argv + flags) == 0
    out = capsys.readouterr()
    ids = Tokenizer.from_dir(checkpoint).encode(PROMPT)
    assert out.out == expected_text(checkpoint, ids, max_new_tokens=12, **kw) + "\n"
    assert "tokens/s" in out.err


def test_chat_wraps_the_prompt_in_the_template(checkpoint, capsys):
    argv = ["generate", "--model", str(checkpoint), "--prompt", PROMPT, "--chat", "--system", "be brief",
            "--max-new-tokens", "8", "--device", "cpu"]
    assert main(argv) == 0
    tokenizer = Tokenizer.from_dir(checkpoint)
    text = tokenizer.apply_chat_template([{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": PROMPT}])
    assert "<|user|>" in text  # the zephyr format: this checkpoint has no template of its own
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert capsys.readouterr().out == expected_text(checkpoint, ids, max_new_tokens=8) + "\n"


def test_info(checkpoint, capsys):
    assert main(["info", "--model", str(checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = stablelm.load(checkpoint)
    assert info["parameters"] == model.num_params()
    assert info["stored_dtypes"] == {"F32": model.num_params()}
    assert info["config"] == model.config.to_dict() and info["quantization"] is None
    assert "tokenizer.json" in info["tokenizer_files"] and info["weight_files"] == ["model.safetensors"]
    assert main(["info", "--model", str(checkpoint.parent / "hf")]) == 0  # the Hugging Face original too
    text = capsys.readouterr().out
    assert "Hugging Face" in text and f"parameters: {model.num_params():,}" in text


@pytest.mark.parametrize("argv,match", [
    (["generate", "--prompt", "hi", "--chat"], "--chat needs"),
    (["generate", "--prompt", "hi", "--temperature", "0", "--top-k", "3"], "greedy"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "--prompt", "hi", "--num-beams", "2", "--temperature", "0.5"], "num_beams"),
    (["info", "--model", "/nonexistent/dir"], "model directory /nonexistent/dir does not exist"),
])
def test_bad_arguments_exit_with_a_message(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err
