"""bench.report_train --tiny on the CPU: every row (LoRA peft / fused layouts, the compiled step, gradient
checkpointing, full fine-tuning, QLoRA int8 / int4 / nf4, the transformers peers) present and finite, identical
weights give the same step-0 loss, and the layouts train the parameter counts their adapter shapes imply (the peft
layout: peft's)."""
import json
import math

import pytest

from bench import report_train
from stablelm import StableLM, preset
from vision.swin import swin_tiny_test


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report_train.json"
    # stablelm.lora on the transformers side, so the result does not depend on whether peft is installed.
    payload = report_train.main(["--tiny", "--hf-lora", "stablelm.lora", "--out", str(out)])
    return payload, out


def test_rows_present_and_finite(run):
    payload, out = run
    rows = {r["impl"]: r for r in payload["rows"]}
    assert set(rows) == set(report_train.ROWS)
    for r in rows.values():
        assert r["batch"] == 2 and r["steps"] == 2
        for key in ("step_ms", "tokens_per_s", "loss_step0", "loss_last", "speedup", "p10_ms", "p90_ms", "compile_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["impl"], key, r[key])
        assert r["p10_ms"] <= r["step_ms"] <= r["p90_ms"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] * 1e3 / r["step_ms"])
        assert r["gpu_busy"] is None and r["peak_vs_budget"] is None  # CUDA-only measurements
    for name, peer in report_train.PEERS.items():
        assert rows[name]["peer"] == peer
        assert rows[name]["speedup"] == pytest.approx(rows[peer]["step_ms"] / rows[name]["step_ms"])
    assert rows["transformers-lora"]["speedup"] == 1.0
    for eager, compiled in (("stablelm-lora-peft", "stablelm-lora-peft-compile"),
                            ("stablelm-lora-peft", "stablelm-lora-peft-compile-default"),
                            ("stablelm-lora-peft", "stablelm-lora-peft-compile-budget"),
                            ("stablelm-lora-peft-ckpt", "stablelm-lora-peft-ckpt-compile")):
        compiled = rows[compiled]
        # --tiny: cheap, and a backend whose partitioner reads the memory budget
        assert (compiled["compile_mode"], compiled["compile_backend"]) == ("default", "aot_eager_decomp_partition")
        assert compiled["speedup_vs_eager"] == pytest.approx(rows[eager]["step_ms"] / compiled["step_ms"])
    assert rows["stablelm-full-mixed-compile"]["speedup_vs_eager"] == pytest.approx(
        rows["stablelm-full-mixed"]["step_ms"] / rows["stablelm-full-mixed-compile"]["step_ms"])
    # bf16 against the float32 rows' loss, on the same weights: the mixed-precision rows compute the same thing
    for name in ("stablelm-full-mixed", "stablelm-full-mixed-compile", "transformers-full-autocast"):
        assert rows[name]["loss_step0"] == pytest.approx(rows["stablelm-full"]["loss_step0"], rel=2e-2), name
    assert rows["stablelm-lora-peft-compile-budget"]["compile_memory_budget"] == 0.5
    assert rows["stablelm-lora-peft-compile"]["compile_memory_budget"] is None
    for fmt in ("int8", "int4", "nf4"):
        q = rows[f"stablelm-qlora-{fmt}"]
        assert q["step_vs_bf16_lora"] > 0
        # Two small AdamW steps from the same start: the quantized base moves the loss by its rounding only.
        assert q["loss_last_rel_vs_bf16_lora"] < 0.05, (fmt, q["loss_last_rel_vs_bf16_lora"])
    saved = json.loads(out.read_text())
    assert saved["env"]["torch"] and saved["rows"] == json.loads(json.dumps(payload["rows"]))


def test_same_weights_same_loss(run):
    payload, _ = run
    rows = {r["impl"]: r for r in payload["rows"]}
    # fp32 on the CPU, same LM / Swin / projector weights and inputs: only summation order may differ.
    assert payload["loss_step0_rel_diff"] < 1e-4
    for name in ("stablelm-lora-fused", "stablelm-lora-peft-compile", "stablelm-lora-peft-compile-default",
                 "stablelm-lora-peft-compile-budget", "stablelm-lora-peft-ckpt", "stablelm-lora-peft-ckpt-compile", "stablelm-full",
                 "transformers-lora-ckpt", "transformers-full"):
        assert rows[name]["loss_step0"] == pytest.approx(rows["transformers-lora"]["loss_step0"], rel=1e-4), name
    ours = rows["stablelm-lora-peft"]
    prompt = ours["seq_len"] - 49 - payload["report_config"]["max_length"]
    assert prompt > 0 and all(0 < n <= 100 for n in payload["report_tokens"])


def test_trainable_counts_follow_the_adapter_layouts(run):
    payload, _ = run
    cfg, r = preset("tiny"), 16
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    projector = swin_tiny_test().num_features * H + H + 2 * H  # Linear + LayerNorm
    fused = r * ((H + q + 2 * kv) + (q + H) + (H + 2 * I) + (I + H))             # fused qkv and gate_up
    peft = r * ((H + q) + 2 * (H + kv) + (q + H) + 2 * (H + I) + (I + H))  # q, k, v, o, gate, up, down
    full = StableLM(cfg).num_params()
    counts = {row["impl"]: row["trainable_params"] for row in payload["rows"]}
    want = {"stablelm-lora-fused": L * fused}
    for name in ("stablelm-lora-peft", "stablelm-lora-peft-compile", "stablelm-lora-peft-compile-default",
                 "stablelm-lora-peft-compile-budget", "stablelm-lora-peft-ckpt", "stablelm-lora-peft-ckpt-compile",
                 "stablelm-qlora-int8",
                 "stablelm-qlora-int4", "stablelm-qlora-nf4",
                 "transformers-lora", "transformers-lora-ckpt"):
        want[name] = L * peft
    for name in ("stablelm-full", "stablelm-full-mixed", "stablelm-full-mixed-compile", "transformers-full",
                 "transformers-full-autocast"):
        want[name] = full
    assert counts == {name: projector + n for name, n in want.items()}


def test_a_row_naming_its_compile_mode_keeps_it():
    """The -compile-default row runs inductor's default mode (no CUDA graphs) while the run's -compile rows take
    --compile-mode; a backend other than inductor has no modes, so every compiled row takes the run's."""
    rows = report_train.ROWS
    assert report_train.row_compile(rows["stablelm-lora-peft-compile-default"][1], "reduce-overhead",
                                    "inductor") == ("default", "inductor")
    assert report_train.row_compile(rows["stablelm-lora-peft-compile"][1], "reduce-overhead",
                                    "inductor") == ("reduce-overhead", "inductor")
    assert report_train.row_compile(rows["stablelm-lora-peft-compile-default"][1], "default",
                                    "aot_eager") == ("default", "aot_eager")
