"""check-op (stablelm/oplab.py): the shipped implementations pass their contracts; deliberately broken ones
(tests/oplab_broken.py) fail with the failing cases named (exit 1); usage errors exit 2 with a clear message."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stablelm.ops as ops
from stablelm import oplab

ROOT = Path(__file__).resolve().parents[1]
BROKEN = "tests/oplab_broken.py"


def check_op_cli(*args, interpret=True):
    """Run `python -m stablelm check-op ...` from the repo root; returns the CompletedProcess."""
    env = dict(os.environ)
    if not interpret:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "stablelm", "check-op", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def with_contract():
    """Ops that have a contract (tests/test_contracts.py fails for any op without one)."""
    out = []
    for op in oplab.op_names():
        try:
            oplab.contract(op)
            out.append(op)
        except oplab.UsageError:
            pass
    return out


def case_names(op, **match):
    return [c.name for c in oplab.contract(op).grid("cpu")
            if all(c.params.get(k) == v for k, v in match.items())]


# ----------------------------------------------------------------------------------------------------------------
# Shipped implementations pass

@pytest.mark.parametrize("op", with_contract())
def test_every_shipped_implementation_passes_check_op(op):
    """In process, one seed, the first CPU case of each op (tests/test_contracts.py runs all of them)."""
    first = oplab.contract(op).grid("cpu")[0].name
    for name in ops.available(op):
        report = oplab.check_op(op, ops.implementation(op, name), device="cpu", seeds=1, cases=[first])
        assert report.passed, report.table()
        assert [r.case.name for r in report.cases] == [first]


def test_cli_passes_the_triton_rotary_with_table_and_json(tmp_path):
    out = tmp_path / "r.json"
    proc = check_op_cli("rotary", "kernels.rotary:rotary_triton", "--device", "cpu", "--seeds", "2",
                        "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in case_names("rotary"):
        assert f"| {name} |" in proc.stdout
    assert "max_abs" in proc.stdout and "rotary: PASS" in proc.stdout
    report = json.loads(out.read_text())
    assert report["passed"] and report["failed"] == [] and report["seeds"] == 2
    assert {c["case"] for c in report["cases"]} == set(case_names("rotary"))
    assert all(c["status"] == "pass" and c["tol_used"] <= 1 for c in report["cases"])


def test_cli_turns_the_interpreter_on_by_itself_on_the_cpu():
    """Without TRITON_INTERPRET in the environment the command re-executes itself with it."""
    if torch.cuda.is_available():
        pytest.skip("the CPU-only path")
    proc = check_op_cli("swiglu", "kernels.mlp:swiglu_triton", "--seeds", "1", "--case", "B1-S1-I1000",
                        interpret=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "swiglu: PASS" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# Broken implementations fail, naming the cases

def _failed(proc):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error:"))
    return set(line.split(": ", 2)[2].split(", "))


def test_case_selection_by_whole_name_or_substring():
    names = [c.name for c in oplab.contract("linear").grid("full")]
    longer = [(a, b) for a in names for b in names if a != b and a in b]
    assert longer, "the grid has a case name inside another: the exact pick below means something"
    short, _ = longer[0]
    exact = oplab.check_op("linear", ops.implementation("linear", "torch"), device="cpu", seeds=1, grid="full",
                           cases=[short])
    assert [r.case.name for r in exact.cases] == [short]
    part = short.split("-")[0]
    by_part = oplab.check_op("linear", ops.implementation("linear", "torch"), device="cpu", seeds=1, grid="full",
                             cases=[part])
    assert {r.case.name for r in by_part.cases} == {n for n in names if part in n}


def test_wrong_sign_rotary_fails_every_case():
    proc = check_op_cli("rotary", f"{BROKEN}:rotary_wrong_sign", "--seeds", "1")
    assert _failed(proc) == set(case_names("rotary"))
    assert "FAIL" in proc.stdout and "out of tolerance" in proc.stdout


def test_off_by_one_position_fails_rotary_and_the_cache_write():
    proc = check_op_cli("rotary", f"{BROKEN}:rotary_off_by_one", "--seeds", "1")
    assert _failed(proc) == set(case_names("rotary"))  # every CPU case has S > 1
    report = oplab.check_op("rotary_cache", f"{BROKEN}:rotary_cache_off_by_one", device="cpu", seeds=1)
    assert set(report.failed) == set(case_names("rotary_cache"))
    assert {r.row()["worst"] for r in report.cases} <= {"k_cache", "v_cache"}  # q itself is right


def test_wrong_gqa_mapping_fails_exactly_the_grouped_cases():
    proc = check_op_cli("attention", f"{BROKEN}:attention_wrong_gqa", "--seeds", "1")
    grouped = {c.name for c in oplab.contract("attention").grid("cpu")
               if 1 < c.params["Hkv"] < c.params["Hq"]}
    assert grouped and _failed(proc) == grouped
    assert "Hkv4" in proc.stdout and "Hkv1" in proc.stdout  # the others ran and passed


def test_silent_upcast_fails_the_16_bit_cases_with_the_dtype_named():
    proc = check_op_cli("swiglu", f"{BROKEN}:swiglu_upcast", "--seeds", "1")
    half = {c.name for c in oplab.contract("swiglu").grid("cpu") if c.dtype != torch.float32}
    assert half and _failed(proc) == half
    assert "dtype torch.float32, expected torch.bfloat16" in proc.stdout


def test_an_implementation_that_raises_fails_with_its_error_in_the_row():
    report = oplab.check_op("swiglu", f"{BROKEN}:swiglu_raises", device="cpu", seeds=1)
    assert not report.passed and set(report.failed) == set(case_names("swiglu"))
    assert "RuntimeError: kernel exploded" in report.table()


def test_a_device_fault_names_its_case_and_the_rest_fail_unrun():
    # An illegal address kills the CUDA context: the case that raised is named, the later ones are reported as not
    # run (never as passed), and the model verdict, which would run on the dead context, is skipped.
    names = case_names("swiglu")
    assert len(names) >= 3
    report = oplab.check_op("swiglu", f"{BROKEN}:swiglu_faults_on_its_second_case", device="cpu", seeds=1,
                            model=True)
    assert report.cases[0].passed and report.failed == names[1:]
    assert "AcceleratorError: CUDA error: an illegal memory access" in report.cases[1].error
    assert all(c.error == f"not run: case {names[1]} lost the CUDA context" for c in report.cases[2:])
    assert report.model is None and any(f"{len(names) - 2} cases after it were not run" in n for n in report.notes)


# ----------------------------------------------------------------------------------------------------------------
# Usage errors exit 2

@pytest.mark.parametrize("args,message", [
    (["nope", "kernels.rotary:rotary_triton"], "unknown op 'nope'; ops are adamw_master, attention"),
    (["rotary", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
    (["rotary", "kernels.rotary:nope"], "module 'kernels.rotary' has no attribute 'nope'"),
    (["rotary", "kernels.rotary"], "must be given as MODULE:FUNCTION"),
    (["rotary", f"{BROKEN}:rotary_swapped_args"], "parameter 2 is named 'sin', expected 'cos'"),
    (["rotary", f"{BROKEN}:NOT_CALLABLE"], "is a int, not a function"),
    (["rotary", "missing/file.py:f"], "no file missing/file.py"),
    (["swiglu", "kernels.mlp:swiglu_ref", "--case", "no-such-case"], "no cpu-grid case of swiglu matches"),
    (["swiglu", "kernels.mlp:swiglu_ref", "--seeds", "0"], "seeds must be a positive integer"),
])
def test_usage_errors_return_2_with_a_message(args, message, capsys, monkeypatch):
    """In process (cli.main), from the repo root as the command runs."""
    from stablelm import cli
    monkeypatch.chdir(ROOT)
    assert cli.main(["check-op", *args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_usage_error_from_the_command_line_exits_2_without_a_traceback():
    proc = check_op_cli("rotary", f"{BROKEN}:rotary_swapped_args")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor)" in proc.stderr
    assert proc.stdout == ""


def test_signature_check_details():
    def extra_with_default(q, k, cos, sin, block=64):
        return q, k

    def extra_without_default(q, k, cos, sin, block):
        return q, k

    def wrong_default(q, k, v, kv_start=None, causal=False, scale=None):
        return q

    assert oplab.signature_problems("rotary", extra_with_default) == []
    assert oplab.signature_problems("rotary", extra_without_default) == ["extra parameter 'block' has no default"]
    assert oplab.signature_problems("attention", wrong_default) == [
        "parameter 'causal' has default False, expected default True"]
    assert oplab.signature_problems("rotary", lambda *args: args)[0].startswith("parameter 0 is *args")
    # decode_attention_triton's extra `splits=None` is allowed
    assert oplab.signature_problems("decode_attention", ops.implementation("decode_attention", "triton")) == []


# ----------------------------------------------------------------------------------------------------------------
# Whole model

def test_model_verdict_fails_the_wrong_sign_rotary():
    """(A passing verdict: tests/test_tutorial.py, the tutorial's naive Triton rotary with model=True.)"""
    bad = oplab.check_op("rotary", f"{BROKEN}:rotary_wrong_sign", device="cpu", seeds=1, cases=["B2-S7-Hq8-Hkv1"],
                         model=True, name="broken_sign")
    assert "whole model (tiny" in bad.table()
    checks = {c["check"]: c for c in bad.model["checks"]}
    assert not checks["logits_vs_transformers"]["passed"]
    assert checks["logits_vs_transformers"]["reference_impl"] < checks["logits_vs_transformers"]["limit"]
    assert "model:logits_vs_transformers" in bad.failed
    assert ops.implementation("rotary", "broken_sign") is not None  # registered under the asked name
    assert ops.current("rotary", "cpu") == "torch"  # and not left chosen


def test_model_verdict_passes_a_shipped_triton_op():
    good = oplab.check_op("swiglu", ops.implementation("swiglu", "triton"), device="cpu", seeds=1,
                          cases=["B1-S1-I1000"], model=True)
    assert good.passed, good.table()
    assert good.model["impl"] == "triton"  # a registered function keeps its name


def test_model_verdict_fails_the_wrong_gqa_attention():
    report = oplab.check_op("attention", f"{BROKEN}:attention_wrong_gqa", device="cpu", seeds=1, cases=["Sq1-Sk1"],
                            model=True, name="broken_gqa")
    assert report.cases[0].passed  # Hq4 / Hkv4: no grouping, nothing to get wrong in this case
    assert report.failed == ["model:logits_vs_transformers", "model:greedy_tokens_vs_transformers"]


# ----------------------------------------------------------------------------------------------------------------
# GPU (the lead runs these): full grid, model at the 3B shape with speed, op speed

GPU_GRID_SHARDS = 32  # each (op, implementation) grid in interleaved parts, so pytest-xdist spreads the slow ones


@pytest.mark.gpu
@pytest.mark.parametrize("shard", range(GPU_GRID_SHARDS))
@pytest.mark.parametrize("op, name", [(op, name) for op in with_contract() for name in ops.available(op)])
def test_gpu_full_grid_every_shipped_implementation(op, name, shard):
    cases = [c.name for c in oplab.contract(op).grid("full")][shard::GPU_GRID_SHARDS]
    if not cases:
        pytest.skip(f"{op}'s grid has fewer than {shard + 1} cases")
    report = oplab.check_op(op, ops.implementation(op, name), device="cuda", seeds=2, cases=cases)
    assert report.passed, report.table()


@pytest.mark.gpu
def test_gpu_cli_model_and_speed(tmp_path):
    out = tmp_path / "rotary.json"
    proc = check_op_cli("rotary", "kernels.rotary:rotary_triton", "--device", "cuda", "--seeds", "2",
                        "--model", "--speed", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["model"]["shape"] == "StableLM-3B shape" and report["model"]["passed"]
    assert {r["phase"] for r in report["model"]["speed"]} == {"prefill", "decode"}
    rows = report["speed"]["rows"]
    assert {r["impl"] for r in rows} >= {"torch", "triton"}
    assert all(0 < r["frac_copy"] < 1.5 for r in rows if "frac_copy" in r)
    print(proc.stdout)
