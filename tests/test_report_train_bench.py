"""bench.report_train --tiny on the CPU: both rows present and finite, identical weights give the same step-0
loss, and the LoRA layouts train the parameter counts their adapter shapes imply."""
import json
import math

import pytest

from bench import report_train
from stablelm import preset
from vision.swin import swin_tiny_test


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report_train.json"
    # vision.lora on the transformers side, so the result does not depend on whether peft is installed.
    payload = report_train.main(["--tiny", "--hf-lora", "vision.lora", "--out", str(out)])
    return payload, out


def test_rows_present_and_finite(run):
    payload, out = run
    rows = {r["impl"]: r for r in payload["rows"]}
    assert set(rows) == {"stablelm", "transformers+vision.lora"}
    for r in rows.values():
        assert r["batch"] == 2
        for key in ("step_ms", "tokens_per_s", "loss_step0", "loss_last", "speedup"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["impl"], key, r[key])
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] * 1e3 / r["step_ms"])
    assert rows["transformers+vision.lora"]["speedup"] == 1.0
    saved = json.loads(out.read_text())
    assert saved["env"]["torch"] and saved["rows"] == json.loads(json.dumps(payload["rows"]))


def test_same_weights_same_loss(run):
    payload, _ = run
    # fp32 on the CPU, same LM / Swin / projector weights and inputs: only summation order may differ.
    assert payload["loss_step0_rel_diff"] < 1e-4
    ours = next(r for r in payload["rows"] if r["impl"] == "stablelm")
    prompt = ours["seq_len"] - 49 - payload["report_config"]["max_length"]
    assert prompt > 0 and all(0 < n <= 100 for n in payload["report_tokens"])


def test_trainable_counts_follow_the_adapter_layouts(run):
    payload, _ = run
    cfg, r = preset("tiny"), 16
    H, I = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    projector = swin_tiny_test().num_features * H + H + 2 * H  # Linear + LayerNorm
    ours = r * ((H + q + 2 * kv) + (q + H) + (H + 2 * I) + (I + H))              # fused qkv and gate_up
    theirs = r * ((H + q) + 2 * (H + kv) + (q + H) + 2 * (H + I) + (I + H))  # q, k, v, o, gate, up, down
    counts = {row["impl"]: row["trainable_params"] for row in payload["rows"]}
    assert counts == {"stablelm": projector + cfg.num_hidden_layers * ours,
                      "transformers+vision.lora": projector + cfg.num_hidden_layers * theirs}
