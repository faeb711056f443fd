"""Tensor parallelism (stablelm/parallel.py) on the CPU: gloo, 2 ranks under torchrun, against TP=1 (the plain,
single-process model) on random-weight transformers checkpoints converted with the project converter.

One torchrun job (this file run as a script, `worker` mode) loads every variant with tp=2 and writes what each
rank computed; the tests compare it with TP=1 computed here. The same job then checks rank failure (one launch
fewer on a busy CI machine): rank 1 raises while rank 0 waits in an all-reduce, and the whole job must exit
non-zero with rank 1's error, in bounded time. A second job runs `python -m stablelm generate --tp 2` (prints
once, the same text as one process).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a torchrun worker script
    sys.path.insert(0, str(ROOT))

import stablelm  # noqa: E402
from stablelm import StableLM, ops, parallel, preset  # noqa: E402
from stablelm.config import StableLMConfig  # noqa: E402
from stablelm.generate import generate  # noqa: E402

# Each covers several of the options the issue names; together: GQA with 1 kv head (replicated over the ranks) and
# 2 (split), plain MHA, qkv bias, qk-LayerNorm, parallel residual, tied embeddings, a vocabulary that does not split
# evenly (97 = 49 + 48 rows, padded for the all-gather), int8 and int4 checkpoints.
VARIANTS = {
    "kv1_bias_qkln_vocab97": (dict(num_key_value_heads=1, use_qkv_bias=True, qk_layernorm=True, vocab_size=97), []),
    "kv2_parallel_tied": (dict(num_key_value_heads=2, use_parallel_residual=True, tie_word_embeddings=True), []),
    "mha_all": (dict(use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True, tie_word_embeddings=True),
                []),
    "int8": (dict(num_key_value_heads=2, use_qkv_bias=True, qk_layernorm=True), ["--quant", "int8"]),
    "int4": (dict(num_key_value_heads=1, intermediate_size=128, tie_word_embeddings=True),
             ["--quant", "int4", "--group-size", "32"]),
}
NEW_TOKENS = 6
TP = 2
JOB_TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, timeout=JOB_TIMEOUT, env=None):
    """`python -m torch.distributed.run --nproc-per-node 2 ARGS` on a free port, gloo-friendly environment."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", parallel.TIMEOUT_ENV: "60", **(env or {})}
    for attempt in range(3):  # another process may take the free port before torchrun binds it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(TP), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), *args]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0 or "address already in use" not in r.stderr.lower():
            return r
    return r


def inputs(vocab: int) -> dict:
    g = torch.Generator().manual_seed(vocab)
    return {"batch": torch.randint(3, vocab, (2, 9), generator=g), "one": torch.randint(3, vocab, (1, 7), generator=g)}


def compute(model, ids: dict) -> dict:
    """What both TP=1 and every TP=2 rank compute: full logits, greedy / beam / sampled tokens."""
    with torch.no_grad():
        logits = model(ids["batch"])
    return {
        "logits": logits,
        "greedy": generate(model, ids["batch"], max_new_tokens=NEW_TOKENS),
        "beam": generate(model, ids["one"], max_new_tokens=NEW_TOKENS, num_beams=3),
        "sample": generate(model, ids["batch"], max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20, seed=7),
    }


# ---------------------------------------------------------------- worker (run by torchrun)
def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = {}
    for name, directory in spec["variants"].items():
        model = stablelm.load(directory, tp=TP)
        cfg = model.config
        local = {"kv_heads": cfg.num_key_value_heads, "heads": cfg.num_attention_heads,
                 "cache_kv_heads": model.make_cache(1, 4).k[0].shape[1], "head_dim": cfg.head_dim}
        out[name] = {**compute(model, inputs(cfg.vocab_size)), "local": local}
    torch.save(out, Path(spec["out"]) / f"rank{parallel.rank()}.pt")
    torch.distributed.barrier()  # both results are written before the failure below
    # Rank failure: rank 1 raises; rank 0 waits in an all-reduce that rank 1 never joins.
    if parallel.rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    torch.distributed.all_reduce(torch.ones(1))
    print("rank 0 passed the all-reduce", flush=True)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import convert_weights
    from hf_utils import hf_model

    tmp = tmp_path_factory.mktemp("tp")
    dirs = {}
    for name, (overrides, convert_args) in VARIANTS.items():
        hf_model(seed=len(name), **overrides).save_pretrained(tmp / f"{name}-hf")
        convert_weights.main([str(tmp / f"{name}-hf"), str(tmp / name), *convert_args])
        dirs[name] = str(tmp / name)
    # An unconverted Hugging Face directory: every rank converts it in memory, then keeps its slices.
    dirs["from_hf_dir"] = str(tmp / "kv2_parallel_tied-hf")
    return tmp, dirs


@pytest.fixture(scope="module")
def tp_job(checkpoints):
    """(the finished torchrun job, its seconds, the results directory)."""
    tmp, dirs = checkpoints
    out = tmp / "results"
    out.mkdir()
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"variants": dirs, "out": str(out)}))
    start = time.monotonic()
    r = torchrun(__file__, "worker", str(spec))
    return r, time.monotonic() - start, out


@pytest.fixture(scope="module")
def tp_results(checkpoints, tp_job):
    """(TP=1 results, [rank 0's, rank 1's]) per variant."""
    _, dirs = checkpoints
    r, _, out = tp_job
    missing = [i for i in range(TP) if not (out / f"rank{i}.pt").exists()]
    assert not missing, f"ranks {missing} wrote no results:\n" + r.stdout[-3000:] + r.stderr[-6000:]
    ranks = [torch.load(out / f"rank{i}.pt") for i in range(TP)]
    ref = {}
    for name, directory in dirs.items():
        model = stablelm.load(directory)
        ref[name] = compute(model, inputs(model.config.vocab_size))
    return ref, ranks


# ---------------------------------------------------------------- TP=2 against TP=1
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_tp1(variant, tp_results):
    ref, ranks = tp_results
    for r, got in enumerate(ranks):
        diff = (got[variant]["logits"] - ref[variant]["logits"]).abs().max().item()
        assert diff < 1e-5, f"rank {r}: max |TP=2 - TP=1| = {diff}"
    # The all-gather hands every rank the same logits, bit for bit (so their selections cannot drift apart).
    assert torch.equal(ranks[0][variant]["logits"], ranks[1][variant]["logits"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
def test_generation_token_identical(variant, mode, tp_results):
    ref, ranks = tp_results
    for r, got in enumerate(ranks):
        assert got[variant][mode].tolist() == ref[variant][mode].tolist(), f"rank {r} {mode}"


@pytest.mark.parametrize("mode", ["logits", "greedy", "beam"])
def test_hugging_face_directory_under_tp(mode, tp_results):
    ref, ranks = tp_results
    for got in ranks:
        if mode == "logits":
            assert (got["from_hf_dir"]["logits"] - ref["from_hf_dir"]["logits"]).abs().max().item() < 1e-5
        else:
            assert got["from_hf_dir"][mode].tolist() == ref["from_hf_dir"][mode].tolist()


def test_each_rank_holds_its_share(tp_results):
    _, ranks = tp_results
    for got in ranks:
        # 4 query heads over 2 ranks; kv heads 1 (replicated: one per rank), 2 (split) and 4 (split).
        assert got["kv1_bias_qkln_vocab97"]["local"] == {"kv_heads": 1, "heads": 2, "cache_kv_heads": 1,
                                                          "head_dim": 16}
        assert got["kv2_parallel_tied"]["local"]["cache_kv_heads"] == 1
        assert got["mha_all"]["local"]["cache_kv_heads"] == 2


# ---------------------------------------------------------------- launches
def test_cli_generate_under_torchrun_prints_once(checkpoints, capsys):
    import convert_weights
    from hf_utils import hf_model
    from test_cli import CORPUS, PROMPT  # the same byte-level BPE recipe as the CLI tests
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from stablelm.cli import main

    tmp, _ = checkpoints
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    src, dst = tmp / "cli-hf", tmp / "cli"
    hf = hf_model(vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=0, num_key_value_heads=2)
    hf.save_pretrained(src)
    tok.save(str(src / "tokenizer.json"))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    (src / "tokenizer_config.json").write_text(json.dumps(special))
    convert_weights.main([str(src), str(dst)])
    args = ["generate", "--model", str(dst), "--prompt", PROMPT, "--max-new-tokens", "8", "--device", "cpu"]
    capsys.readouterr()
    assert main(args) == 0
    expected = capsys.readouterr().out
    assert expected.strip(), "the plain run printed no text to compare with"

    r = torchrun("-m", "stablelm", *args, "--tp", "2")
    assert r.returncode == 0, r.stderr[-6000:]
    assert r.stdout == expected, (r.stdout, expected)


def test_rank_failure_exits_nonzero_without_hanging(tp_job):
    r, elapsed, out = tp_job
    assert (out / "rank1.pt").exists(), r.stderr[-6000:]  # it got as far as the deliberate failure
    assert r.returncode != 0
    assert "rank 1 fails on purpose" in r.stderr
    assert "passed the all-reduce" not in r.stdout
    # The group's timeout is 60 s here (STABLELM_DIST_TIMEOUT); torchrun tears the job down well before it.
    assert elapsed < 120, f"the job took {elapsed:.0f} s to come down"


# ---------------------------------------------------------------- the split itself (no processes)
def cfg(**kw) -> StableLMConfig:
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4)
    return StableLMConfig(**{**base, **kw})


def test_kv_heads_split_or_replicated():
    c = cfg(hidden_size=128, num_attention_heads=8, num_key_value_heads=2)
    # 4 ranks, 2 kv heads: ranks 0-1 read kv head 0, ranks 2-3 kv head 1; query heads 2 per rank.
    shards = [parallel.Shard.of(c, r, 4) for r in range(4)]
    assert [list(s.kv_heads) for s in shards] == [[0], [0], [1], [1]]
    assert [list(s.heads) for s in shards] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(s.kv_heads) for s in (parallel.Shard.of(c, r, 2) for r in range(2))] == [[0], [1]]
    rc = shards[3].config(c)
    assert (rc.num_attention_heads, rc.num_key_value_heads, rc.head_dim, rc.intermediate_size) == (2, 1, 16, 44)
    assert rc.full() == c


def test_uneven_vocab_is_padded_for_the_gather():
    shards = [parallel.Shard.of(cfg(vocab_size=97), r, 2) for r in range(2)]
    assert [(s.vocab.start, s.vocab.stop, s.vocab_chunk) for s in shards] == [(0, 49, 49), (49, 97, 49)]


@pytest.mark.parametrize("kw, tp, message", [
    (dict(num_attention_heads=4, num_key_value_heads=4), 3, "num_attention_heads=4"),
    (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3), 2, "num_key_value_heads=3"),
    (dict(intermediate_size=175), 2, "intermediate_size=175"),
])
def test_dimensions_that_do_not_split_are_refused(kw, tp, message):
    with pytest.raises(ValueError, match=message):
        parallel.Shard.of(cfg(**kw), 0, tp)


def test_int4_row_parallel_must_keep_groups_whole():
    c = cfg(intermediate_size=128)
    parallel.Shard.of(c, 0, 2, {"bits": 4, "group_size": 32})  # o: K/tp = 32, down: 64
    with pytest.raises(ValueError, match=r"attn.o gets K/tp=32 .* group_size=64"):
        parallel.Shard.of(c, 0, 2, {"bits": 4, "group_size": 64})


def test_finish_leaves_the_group_and_a_new_one_can_start(world_of_one):
    parallel.init_distributed("cpu")
    assert torch.distributed.is_initialized()
    parallel.finish()
    assert not torch.distributed.is_initialized()
    parallel.finish()  # nothing to leave: a no-op
    parallel.init_distributed("cpu")
    assert torch.distributed.get_world_size() == 1


def test_tp1_in_process_equals_plain_and_is_inference_only(checkpoints, world_of_one):
    _, dirs = checkpoints
    plain, tp = stablelm.load(dirs["kv2_parallel_tied"]), stablelm.load(dirs["kv2_parallel_tied"], tp=1)
    assert torch.distributed.get_world_size() == 1 and torch.distributed.get_backend() == "gloo"
    ids = inputs(plain.config.vocab_size)["batch"]
    with torch.no_grad():
        assert torch.equal(plain(ids), tp(ids))
    with pytest.raises(RuntimeError, match="inference-only"):
        tp(ids)  # grad mode on: the collectives have no backward


@pytest.mark.parametrize("name", ["kv2_parallel_tied", "kv1_bias_qkln_vocab97"])
def test_tp1_runs_the_plain_models_kernels(checkpoints, world_of_one, name):
    """At TP=1 every product goes through the op the plain model calls, so a batch-1 decode token (where the
    Triton linear takes its GEMV, not F.linear) gives the same logits bit for bit: the head, tied or not, and a
    row-parallel bias included."""
    _, dirs = checkpoints
    plain, tp = stablelm.load(dirs[name]), stablelm.load(dirs[name], tp=1)
    one = inputs(plain.config.vocab_size)["one"][:, :1]
    with torch.no_grad(), ops.using(linear="triton"):
        assert torch.equal(plain(one), tp(one))


def test_tp1_from_a_bf16_model_in_memory_equals_it(world_of_one):
    """bench/tp_decode's pairing: the plain model from StableLM.random in bf16, TP=1 from its state dict. Both
    hold float32 rotary frequencies (a model-wide .to(bf16) used to round the plain one's)."""
    cfg = preset("tiny")
    plain = StableLM.random(cfg, dtype=torch.bfloat16)
    tp = parallel.load_sharded(cfg, None, plain.state_dict(), tp=1, dtype=torch.bfloat16)
    assert plain.rotary.inv_freq.dtype == tp.rotary.inv_freq.dtype == torch.float32
    ids = torch.randint(3, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(ids), tp(ids))
    assert torch.equal(generate(plain, ids, max_new_tokens=8), generate(tp, ids, max_new_tokens=8))


@pytest.mark.parametrize("quant", [["--quant", "int8"], ["--quant", "int4", "--group-size", "32"]])
def test_tp1_loads_a_quantized_head(tmp_path, world_of_one, quant):
    """A checkpoint converted with --quantize-head: the rank's head is the quantized one, sliced by vocab rows."""
    import convert_weights
    from hf_utils import hf_model

    hf_model(seed=5, num_key_value_heads=2, intermediate_size=128).save_pretrained(tmp_path / "hf")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "q"), *quant, "--quantize-head"])
    plain, tp = stablelm.load(tmp_path / "q"), stablelm.load(tmp_path / "q", tp=1)
    assert type(tp.lm_head.local) is type(plain.lm_head)
    ids = inputs(plain.config.vocab_size)["batch"]
    with torch.no_grad():
        assert torch.equal(plain(ids), tp(ids))


def test_tp_refuses_nf4_by_name():
    cfg = StableLMConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
                         vocab_size=100)
    with pytest.raises(ValueError, match="nf4"):
        parallel.Shard.of(cfg, 0, 2, {"bits": 4, "group_size": 64, "format": "nf4"})


def test_tp_must_equal_the_world_size(checkpoints, world_of_one):
    _, dirs = checkpoints
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        stablelm.load(dirs["mha_all"], tp=2)


def test_bench_tp_decode_tiny(world_of_one):
    from bench import tp_decode

    rows = tp_decode.main(["--tiny", "--rows", "1x8", "--new-tokens", "4", "--iters", "1"])
    assert len(rows) == 1 and rows[0]["world"] == 1 and rows[0]["tokens_match"] is True
    assert rows[0]["tp_step_ms"] > 0 and rows[0]["plain_step_ms"] > 0
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_tp1_through_nccl_equals_plain_path(checkpoints):
    """World size 1 over NCCL (in process): logits and greedy tokens with the CUDA-graph decode step, which then
    captures the all-reduces and the all-gather, equal the plain model's."""
    from stablelm.generate import DecodeSession

    _, dirs = checkpoints
    try:
        for name, dtype in (("kv1_bias_qkln_vocab97", "fp32"), ("kv2_parallel_tied", "bf16"), ("int8", "fp32")):
            plain = stablelm.load(dirs[name], device="cuda", dtype=dtype)
            tp = stablelm.load(dirs[name], device="cuda", dtype=dtype, tp=1)
            assert torch.distributed.get_backend() == "nccl"
            ids = {k: v.cuda() for k, v in inputs(plain.config.vocab_size).items()}
            with torch.no_grad():
                a, b = plain(ids["batch"]).float(), tp(ids["batch"]).float()
            assert (a - b).abs().max().item() < 1e-5, name  # a world of one: the collectives copy, bit for bit
            for kw in (dict(), dict(num_beams=3)):
                x = ids["one"] if kw else ids["batch"]
                session = DecodeSession(tp)
                want = generate(plain, x, max_new_tokens=16, cuda_graph=True, **kw)
                got = generate(tp, x, max_new_tokens=16, cuda_graph=True, session=session, **kw)
                assert got.tolist() == want.tolist(), (name, kw)
                # The steps were recorded as CUDA graphs, the all-reduces and the all-gather inside them.
                steps = [step for bucket in session._buckets.values() for step in bucket.steps.values()]
                assert session.builds and all(hasattr(step, "graph") for step in steps)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    {"worker": lambda: worker(sys.argv[2])}[sys.argv[1]]()
