"""Generated from the op contracts (kernels/contract.py, CONTRACTS beside each reference in kernels/): every case of
the CPU grid (every case on a GPU) for every implementation registered in stablelm.ops, so a newly registered
implementation gets exactly the checks the shipped ones pass. `python -m stablelm check-op` runs the same cases."""
import pytest
import torch

import stablelm.ops as ops
from kernels import contract as kc
from stablelm import oplab

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRID = "full" if DEVICE == "cuda" else "cpu"
SEEDS = (0, 1) if DEVICE == "cuda" else (0,)  # the interpreter is slow: one draw per case in CI

_reference_runs: dict = {}


def _contracts():
    """{op: contract} for the ops that have one (test_every_op_has_a_contract... names those without)."""
    out = {}
    for op in oplab.op_names():
        try:
            out[op] = oplab.contract(op)
        except oplab.UsageError:
            pass
    return out


def _params():
    for op, con in _contracts().items():
        for name in ops.available(op):
            for case in con.grid(GRID):
                yield pytest.param(op, name, case.name, id=f"{op}/{name}/{case.name}")


@pytest.mark.parametrize("op,impl,case_name", list(_params()))
def test_contract(op, impl, case_name):
    con = oplab.contract(op)
    result = kc.run_case(con, ops.implementation(op, impl), con.case(case_name), seeds=SEEDS, device=DEVICE,
                         reference_runs=_reference_runs)
    assert result.passed, result.row()


def test_every_op_has_a_contract_whose_reference_is_the_torch_implementation():
    missing = sorted(set(ops.CUDA_PREFERENCE) - set(_contracts()))
    assert not missing, f"ops without a CONTRACTS entry beside their reference: {missing}"
    for op in ops.CUDA_PREFERENCE:
        con = oplab.contract(op)
        assert con.op == op
        assert con.reference is ops.implementation(op, "torch")
        assert con.grid("cpu"), f"{op}: empty CPU grid"
        assert all(c.dtype in con.tol for c in con.cases)


def test_contract_grids_cover_what_matters():
    """The issue's list: odd lengths, head_dim 64/80/128, GQA ratios, left padding, rotary dims 20/32/80, decode
    contexts past one split, int4 group sizes; every dtype in the full grid."""
    def values(op, key):
        return {c.params.get(key) for c in oplab.contract(op).cases}
    assert {64, 80, 128} <= values("attention", "D") and {64, 80, 128} <= values("decode_attention", "D")
    assert {20, 32, 80} <= values("rotary", "R")
    assert {(4, 4), (4, 2), (8, 1)} <= {(c.params["Hq"], c.params["Hkv"]) for c in oplab.contract("attention").cases}
    assert True in values("attention", "pad") and True in values("decode_attention", "pad")
    assert any(S % 2 == 1 and S > 1 for S in values("attention", "Sq"))
    assert max(values("decode_attention", "T")) > 4096 and 300 in values("decode_attention", "T")
    assert {32, 64, 128} <= values("quant_linear", "group")
    for op, con in _contracts().items():
        assert {c.dtype for c in con.cases} == set(kc.FLOAT_DTYPES), op
        assert any(c.grad for c in con.cases) == (con.grad_tol is not None), op


@pytest.mark.parametrize("op", sorted(_contracts()))
def test_inputs_are_fresh_random_never_zero(op):
    """Different per seed and per case, no all-zero tensor, and the same on a second call (the candidate and the
    reference see equal inputs)."""
    con = oplab.contract(op)
    case = con.grid("cpu")[0]
    a, b, again = (con.make_inputs(case, s, "cpu") for s in (0, 1, 0))
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert tensors
    for k in tensors:
        assert a[k].count_nonzero() == a[k].numel(), f"{op}.{k} has zeros"
        assert not torch.equal(a[k], b[k]), f"{op}.{k} is the same for two seeds"
        assert torch.equal(a[k], again[k]) and a[k].stride() == again[k].stride()
    other = con.grid("cpu")[1]
    c = con.make_inputs(other, 0, "cpu")
    assert any(not (a[k].shape == c[k].shape and torch.equal(a[k], c[k])) for k in tensors)


def test_compare_catches_dtype_shape_nonfinite_and_tolerance():
    ref = torch.randn(4, 5, dtype=torch.bfloat16)
    tol = kc.Tol(1e-2, 1e-2)
    assert kc.compare("x", ref.clone(), ref, tol).ok
    assert "dtype" in kc.compare("x", ref.float(), ref, tol).problem
    assert "shape" in kc.compare("x", ref[:, :4], ref, tol).problem
    bad = ref.clone()
    bad[0, 0] = float("nan")
    assert "non-finite" in kc.compare("x", bad, ref, tol).problem
    off = ref.clone()
    off[1, 1] += 1.0
    check = kc.compare("x", off, ref, tol)
    assert not check.ok and check.max_abs >= 0.9 and check.tol_used > 1


def test_case_names_are_unique_and_cpu_names_must_exist():
    with pytest.raises(ValueError, match="CPU grid names no case"):
        kc.make_cases([dict(B=1)], [torch.float32], cpu={"B2-fp32"})
    case = kc.make_cases([dict(B=1, pad=True, scale=None)], [torch.float16], grad=(True,), cpu={"B1-pad-fp16-grad"})
    assert [c.name for c in case] == ["B1-pad-fp16-grad"] and case[0].cpu
