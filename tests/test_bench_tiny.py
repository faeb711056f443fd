"""The benchmark scripts' --tiny mode runs on the CPU and produces sane rows (the GPU numbers come from the
same code paths)."""
import json
import os

import pytest

from bench import decode, prefill


def test_decode_tiny(tmp_path):
    out = tmp_path / "d.json"
    payload = decode.main(["--tiny", "--out", str(out)])
    rows = {r["impl"]: r for r in payload["rows"]}
    assert set(rows) == {"stablelm", "stablelm-no-pdl", "stablelm-eager", "stablelm-torch-compile",
                         "transformers-sdpa", "transformers-static"}
    assert not [r["error"] for r in rows.values() if "error" in r]
    assert all(r["tokens_per_s"] > 0 and r["call_ms"] > 0 for r in rows.values())
    for impl in ("stablelm", "stablelm-no-pdl", "stablelm-eager", "stablelm-torch-compile"):
        r = rows[impl]
        assert r["step_source"] == "replay" and r["step_ms"] > 0 and r["prefill_ms"] > 0
        assert r["overhead_ms"] == r["call_ms"] - r["prefill_ms"] - (r["new_tokens"] - 1) * r["step_ms"]
        assert r["overhead_marginal_ms"] == (r["call_ms"] - r["prefill_ms"]
                                             - (r["new_tokens"] - 1) * r["marginal_step_ms"])
    ratio = payload["ratios"][0]
    assert ratio["vs transformers-sdpa"] == rows["transformers-sdpa"]["call_ms"] / rows["stablelm"]["call_ms"]
    saved = json.loads(out.read_text())
    assert saved["env"]["torch"] and saved["complete"] and len(saved["rows"]) == len(payload["rows"])


def test_decode_cut_short_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    """A run stopped after its first row (a device call's time limit) leaves that row on disk, marked incomplete,
    and no temporary file."""
    calls = []
    real = decode.ours_row

    def stop_on_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(decode, "ours_row", stop_on_second)
    out = tmp_path / "d.json"
    with pytest.raises(KeyboardInterrupt):
        decode.main(["--tiny", "--peers", "stablelm-eager", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and [r["impl"] for r in saved["rows"]] == ["stablelm"]
    assert saved["rows"][0]["tokens_per_s"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


def test_decode_tiny_quantized_head_and_embedding():
    payload = decode.main(["--tiny", "--quant", "int4", "--quantize-head", "--quantize-embedding", "--peers", "none"])
    rows = {r["impl"]: r for r in payload["rows"]}
    assert set(rows) == {"stablelm-int4-head-embed"}, set(rows)
    assert not [r["error"] for r in rows.values() if "error" in r]
    assert payload["quantize_head"] and payload["quantize_embedding"]
    assert all(r["tokens_per_s"] > 0 for r in rows.values())


def test_decode_quantized_options_need_quant(capsys):
    with pytest.raises(SystemExit) as e:
        decode.main(["--tiny", "--quantize-head"])
    assert e.value.code == 2 and "need --quant" in capsys.readouterr().err


def test_prefill_tiny():
    payload = prefill.main(["--tiny"])
    assert {r["impl"] for r in payload["rows"]} == {"stablelm", "transformers-sdpa", "transformers-eager"}
    assert all(r["ms"] > 0 for r in payload["rows"])


def test_decode_tiny_quantized():
    payload = decode.main(["--tiny", "--quant", "int4", "--peers", "none"])
    assert [r["impl"] for r in payload["rows"]] == ["stablelm-int4"]
    assert payload["rows"][0]["tokens_per_s"] > 0


def test_decode_row_whose_half_length_call_takes_a_smaller_bucket():
    # CPU buckets are 64 slots: the 20 + 64 token call takes a 128-slot cache, the marginal estimate's 20 + 32 token
    # call a 64-slot one, and the replayed steps (at 36 .. 68) fit only the first.
    payload = decode.main(["--tiny", "--rows", "1x20", "--new-tokens", "64", "--peers", "none"])
    (row,) = payload["rows"]
    assert "error" not in row, row["error"]
    assert row["step_ms"] > 0 and row["marginal_step_ms"] is not None


def test_decode_refuses_zero_new_tokens(capsys):
    with pytest.raises(SystemExit) as e:
        decode.main(["--tiny", "--new-tokens", "0"])
    assert e.value.code == 2 and "--new-tokens must be >= 1" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("peer", [None, "torch-compile"])
def test_gpu_profile_decode_from_the_command_line(tmp_path, peer):
    """bench.profile_decode in a subprocess on the tiny preset: our eager step, and the gpt-fast recipe's compiled
    step (--peer torch-compile); each reports the kernels it profiled."""
    import subprocess
    import sys
    out = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "bench.profile_decode", "--preset", "tiny", "--steps", "3", "--out", str(out)]
    result = subprocess.run(cmd + (["--peer", peer] if peer else []), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["kernels_per_step"] > 0 and payload["gpu_us_per_step"] > 0 and payload["rows"]
    assert payload.get("peer") == peer


@pytest.mark.parametrize("cmd", [["bench.quant_gemv_peers", "--ms", "1"], ["bench.pdl_sweep"]])
def test_gpu_only_benchmarks_say_they_need_a_gpu(cmd):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and "error: needs a GPU" in result.stderr


def _bench_in_subprocess(tmp_path, module, *args):
    """Run `python -m module *args --out FILE` (a GPU benchmark) and return the JSON it wrote."""
    import subprocess
    import sys
    out = tmp_path / "out.json"
    result = subprocess.run([sys.executable, "-m", module, *args, "--out", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.gpu
def test_gpu_pdl_sweep_from_the_command_line(tmp_path):
    """bench.pdl_sweep in a subprocess: the step with PDL off and on, one prefetch setting, its speedup column."""
    rows = _bench_in_subprocess(tmp_path, "bench.pdl_sweep", "--formats", "bf16", "--prefetch", "16")["rows"]
    assert [(r["pdl"], r["prefetch_tiles"]) for r in rows] == [("off", None), ("on", 16)]
    assert rows[0]["speedup_vs_off"] == 1.0 and all(r["step_ms"] > 0 for r in rows)


@pytest.mark.gpu
def test_gpu_quant_gemv_peers_from_the_command_line(tmp_path):
    """bench.quant_gemv_peers in a subprocess at one row: every kernel timed at every 3B shape, step totals."""
    payload = _bench_in_subprocess(tmp_path, "bench.quant_gemv_peers", "--ms", "1", "--rep-ms", "2")
    timed = {(r["shape"], r["kernel"]) for r in payload["rows"] if "us" in r}
    assert len(timed) == 5 * 8 and {t["kernel"] for t in payload["step_totals"]} >= {"int4-stablelm", "bf16-cublas"}
