"""The benchmark scripts' --tiny mode runs on the CPU and produces sane rows (the GPU numbers come from the
same code paths)."""
import json

from bench import decode, prefill


def test_decode_tiny(tmp_path):
    out = tmp_path / "d.json"
    payload = decode.main(["--tiny", "--out", str(out)])
    impls = {r["impl"] for r in payload["rows"]}
    assert {"stablelm-eager", "transformers-eager", "transformers-sdpa"} <= impls
    assert all(r["tokens_per_s"] > 0 for r in payload["rows"])
    assert json.loads(out.read_text())["env"]["torch"]


def test_prefill_tiny():
    payload = prefill.main(["--tiny"])
    assert {r["impl"] for r in payload["rows"]} == {"stablelm", "transformers-sdpa", "transformers-eager"}
    assert all(r["ms"] > 0 for r in payload["rows"])


def test_decode_tiny_quantized():
    payload = decode.main(["--tiny", "--quant", "int4"])
    assert {r["impl"] for r in payload["rows"]} == {"stablelm-eager-int4"}
