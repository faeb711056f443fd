"""The converter never loses data and fails cleanly: --overwrite refuses anything but its own earlier output (or
an empty directory), a signal mid-conversion leaves no temporary behind and a killed run's temporary is removed by
the next one, output directories follow the umask, and bad inputs are errors naming the tensor or file. The
command-line cases run convert_weights.py in a subprocess, as a user would."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_weights
import stablelm
import stablelm.checkpoint as ckpt
from hf_utils import hf_model, save_random_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run_convert(*args, umask=None):
    return subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240,
                          preexec_fn=None if umask is None else lambda: os.umask(umask))


def snapshot(path: Path) -> dict:
    """Every file under path with its bytes: equal snapshots mean nothing was changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "models" / "hf"
    hf_model().save_pretrained(path)
    (path / "tokenizer.json").write_text("{}")
    (path / "chat_template.jinja").write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}")
    (tmp_path / "models" / "notes.txt").write_text("a sibling of the source")
    return path


def assert_refused(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "error: " in result.stderr and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


# ---------------------------------------------------------------- --overwrite
def test_destination_is_the_source(src, tmp_path):
    before = snapshot(tmp_path)
    assert_refused(run_convert(src, src, "--overwrite"), "is the source")
    link = tmp_path / "link"
    link.symlink_to(src)  # the same directory under another name
    assert_refused(run_convert(src, link, "--overwrite"), "is the source")
    link.unlink()
    assert snapshot(tmp_path) == before


def test_destination_contains_the_source(src, tmp_path):
    before = snapshot(tmp_path)
    assert_refused(run_convert(src, src.parent, "--overwrite"), "contains the source")
    assert snapshot(tmp_path) == before


def test_unrelated_directory_is_not_replaced(src, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    assert_refused(run_convert(src, other, "--overwrite"), "not the output of an earlier conversion")
    assert snapshot(other) == {"cat.jpg": b"\xff\xd8 not really"}


def test_file_destination_is_an_error_with_or_without_overwrite(src, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    for flags in ([], ["--overwrite"]):
        assert_refused(run_convert(src, target, *flags), "is a file")
        assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "models"]


def test_earlier_output_or_empty_directory_is_replaced(src, tmp_path):
    dst = tmp_path / "conv"
    dst.mkdir()  # empty: fine to replace
    r = run_convert(src, dst, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert_refused(run_convert(src, dst), "--overwrite")  # exists: needs the flag
    r = run_convert(src, dst, "--overwrite", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert stablelm.load(dst).embed.weight.dtype == torch.bfloat16
    r = run_convert(dst, tmp_path / "back", "--to-hf")  # an HF export is recognised as the converter's too
    assert r.returncode == 0, r.stderr
    r = run_convert(dst, tmp_path / "back", "--to-hf", "--overwrite")
    assert r.returncode == 0, r.stderr
    # A file the user put into an earlier output is not the converter's to delete.
    (dst / "my_notes.txt").write_text("keep me")
    assert_refused(run_convert(src, dst, "--overwrite"), "my_notes.txt")
    assert (dst / "my_notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "conv", "models"]


def test_converted_dir_from_before_the_manifest_is_replaced(src, tmp_path):
    dst = tmp_path / "conv"
    convert_weights.main([str(src), str(dst)])
    (dst / ckpt.MANIFEST).unlink()  # as an earlier version wrote it: recognised by config.json's format tag
    convert_weights.main([str(src), str(dst), "--overwrite"])
    assert (dst / ckpt.MANIFEST).exists()


# ---------------------------------------------------------------- signals, stale temporaries, umask
@pytest.fixture(scope="module")
def big_src(tmp_path_factory):
    """Enough tensors (1800, 160 MB) that a conversion is still running when the test signals it."""
    return save_random_hf_checkpoint(tmp_path_factory.mktemp("big") / "hf", hidden_size=128,
                                     intermediate_size=352, num_hidden_layers=200)


def _default_signals():
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def start_and_wait_for_temporary(src, dst):
    # Default dispositions in the child: a runner started under nohup or in a background job hands its children
    # SIGHUP / SIGINT ignored, and the converter rightly leaves an ignored signal ignored.
    proc = subprocess.Popen([sys.executable, str(ROOT / "convert_weights.py"), str(src), str(dst), "--dtype",
                             "fp16"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)
    deadline = time.monotonic() + 120
    while not list(dst.parent.glob(f".{dst.name}.tmp-*")):
        assert proc.poll() is None, f"conversion ended before it was signalled: {proc.communicate()[1]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_mid_conversion_leaves_nothing(big_src, tmp_path, sig):
    dst = tmp_path / "conv"
    proc = start_and_wait_for_temporary(big_src, dst)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (-sig, 128 + sig), err  # ended by the signal, as without the cleanup
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_temporary_of_a_killed_run_is_removed_by_the_next(big_src, tmp_path):
    dst = tmp_path / "conv"
    proc = start_and_wait_for_temporary(big_src, dst)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.wait()
    left = list(tmp_path.glob(".conv.tmp-*"))
    assert [p.name.split("-")[1] for p in left] == [str(proc.pid)]
    # A temporary whose process is alive (this one) is someone's conversion in progress: it stays.
    live = tmp_path / f".conv.tmp-{os.getpid()}-0123abcd"
    live.mkdir()
    r = run_convert(hf_src := save_random_hf_checkpoint(tmp_path / "small"), dst)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "conv", hf_src.name])


def test_output_follows_the_umask(src, tmp_path):
    r = run_convert(src, tmp_path / "out" / "conv", umask=0o027)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "conv").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "conv" / "model.safetensors").stat().st_mode & 0o777 == 0o640


def test_progress_goes_to_stderr(src, tmp_path):
    r = run_convert(src, tmp_path / "conv", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert "reading" in r.stderr and "converting to bf16" in r.stderr and "tensors" in r.stderr
    assert r.stdout == f"wrote {tmp_path / 'conv'}\n"


# ---------------------------------------------------------------- bad inputs and flags
def test_chat_template_is_copied_both_ways(src, tmp_path):
    convert_weights.main([str(src), str(tmp_path / "conv")])
    convert_weights.main([str(tmp_path / "conv"), str(tmp_path / "back"), "--to-hf"])
    for out in ("conv", "back"):
        assert (tmp_path / out / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()


def test_fp16_overflow_names_the_tensor(src, tmp_path):
    path = src / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = 1e6
    save_file(tensors, path)
    with pytest.raises(ckpt.CheckpointError, match=r"layers\.1\.mlp\.down\.weight.*overflow fp16"):
        convert_weights.main([str(src), str(tmp_path / "conv"), "--dtype", "fp16"])
    assert_refused(run_convert(src, tmp_path / "conv", "--dtype", "fp16"), "layers.1.mlp.down.weight")
    convert_weights.main([str(src), str(tmp_path / "conv"), "--dtype", "bf16"])  # bf16 has the range
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "models"]


def test_group_size_is_for_int4_only(src, tmp_path):
    for flags in (["--quant", "int8", "--group-size", "64"], ["--group-size", "64"]):
        assert_refused(run_convert(src, tmp_path / "conv", *flags), "--group-size applies to --quant int4 only")
    convert_weights.main([str(src), str(tmp_path / "int8"), "--quant", "int8"])
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["quantization"] == {"bits": 8,
                                                                                          "group_size": None}
    convert_weights.main([str(src), str(tmp_path / "int4"), "--quant", "int4", "--group-size", "16"])
    assert json.loads((tmp_path / "int4" / "config.json").read_text())["quantization"]["group_size"] == 16
    with torch.no_grad():
        torch.testing.assert_close(stablelm.load(tmp_path / "int8")(torch.tensor([[1, 2, 3]])),
                                   stablelm.load(src)(torch.tensor([[1, 2, 3]])), atol=0.05, rtol=0)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


FIRST, LAST = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("damage,culprit", [
    (lambda d: truncate(d / LAST), LAST),
    (lambda d: (d / FIRST).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad"), FIRST),
    (lambda d: truncate(d / "model.safetensors.index.json", 0.7), "model.safetensors.index.json"),
    (lambda d: (d / "model.safetensors.index.json").write_text('{"metadata": {}}'), "model.safetensors.index.json"),
    (lambda d: (d / "config.json").write_text('{"hidden_size": 64,'), "config.json"),
    (lambda d: (d / "config.json").write_text('[1, 2]'), "config.json"),
], ids=["truncated-shard", "bad-header", "truncated-index", "index-without-map", "bad-json", "json-not-object"])
def test_unreadable_files_are_named(tmp_path, damage, culprit):
    src = tmp_path / "hf"
    hf_model().save_pretrained(src)
    # Two shards and their index, as transformers writes a sharded checkpoint.
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    shards = {FIRST: names[:len(names) // 2], LAST: names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, src / shard)
    (src / "model.safetensors").unlink()
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    stablelm.load(src)  # intact, it loads
    damage(src)
    with pytest.raises(ckpt.CheckpointError, match=culprit.replace(".", r"\.")):
        convert_weights.main([str(src), str(tmp_path / "conv")])
    with pytest.raises(ckpt.CheckpointError, match=culprit.replace(".", r"\.")):
        stablelm.load(src)
    assert_refused(run_convert(src, tmp_path / "conv"), culprit)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_bin_that_is_not_plain_tensors_is_refused_naming_it(tmp_path):
    import datetime

    src = tmp_path / "hf"
    hf_model().save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(tensors, src / "pytorch_model.bin")
    stablelm.load(src)  # plain tensors load
    torch.save({**tensors, "when": datetime.datetime(2024, 1, 1)}, src / "pytorch_model.bin")
    with pytest.raises(ckpt.CheckpointError, match=r"pytorch_model\.bin"):
        stablelm.load(src)


@pytest.mark.parametrize("change", [
    {"num_attention_heads": 8, "num_key_value_heads": 8},  # same qkv/o shapes, other head split
    {"partial_rotary_factor": 0.5},                          # same shapes, twice as much of each head rotates
], ids=["heads", "rotary"])
def test_config_edit_that_keeps_shapes_is_caught_on_load(src, tmp_path, change):
    convert_weights.main([str(src), str(tmp_path / "conv")])
    stablelm.load(tmp_path / "conv")
    meta_path = tmp_path / "conv" / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["config"].update(change)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match=next(iter(change)) + ": converted with"):
        stablelm.load(tmp_path / "conv")
