"""Mixed-precision AdamW: the adamw_master op (kernels/adamw.py, reference and Triton) and MasterAdamW
(stablelm/optim.py) against torch.optim.AdamW over float32 copies, its state dict, and the input checks. The op's
float32 outputs are also checked case by case by tests/test_contracts.py."""
import pytest
import torch

import stablelm.ops as ops
from kernels._common import INTERPRET
from kernels.adamw import CONTRACTS, adamw_master_ref, adamw_master_triton
from stablelm.lora import make_optimizer
from stablelm.optim import MasterAdamW

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = {"torch": adamw_master_ref, "triton": adamw_master_triton}
CASE = {c.name: c for c in CONTRACTS["adamw_master"].cases}


def truncated(x: torch.Tensor, dtype) -> torch.Tensor:
    """x rounded toward zero to bf16 (the upper 16 bits of its float32 pattern)."""
    return (x.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["R3-C257-step7-bf16", "R3-C257-step7-fp16"])
def test_param_is_the_master_rounded(impl, case):
    """The parameter the model computes with is the updated master rounded to nearest, bit for bit. (Triton's CPU
    interpreter converts float32 to bf16 by truncation; on the GPU the kernel's cvt rounds to nearest, which the
    GPU run of this test checks.)"""
    case = CASE[case]
    inputs = CONTRACTS["adamw_master"].make_inputs(case, 0, DEVICE)
    before = inputs["param"].clone()
    IMPLS[impl](**inputs)
    param, master = inputs["param"], inputs["master"]
    assert not torch.equal(param, before)
    if impl == "triton" and INTERPRET and param.dtype == torch.bfloat16:
        assert torch.equal(param, truncated(master, param.dtype))
    else:
        assert torch.equal(param, master.to(param.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_adamw_follows_torch_adamw_on_float32_copies(dtype):
    """Five steps of MasterAdamW on 16-bit parameters update the masters as torch.optim.AdamW updates float32
    parameters that start from the same values and see the same gradients; the parameters stay the masters
    rounded, and a parameter without a gradient is left alone (no state)."""
    torch.manual_seed(1)
    shapes = [(37, 19), (256,), (3, 4, 5)]
    ours = [torch.nn.Parameter(torch.randn(s, device=DEVICE).to(dtype)) for s in shapes]
    idle = torch.nn.Parameter(torch.randn(8, device=DEVICE).to(dtype))
    theirs = [torch.nn.Parameter(p.detach().float().clone()) for p in ours]
    opt = MasterAdamW(ours + [idle], lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
    idle_before = idle.detach().clone()
    for _ in range(5):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, device=DEVICE).to(dtype)
            a.grad, b.grad = g, g.float()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        master = opt.state[a]["master"]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master, b.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], rtol=1e-6, atol=1e-9)
        if ops.current("adamw_master", DEVICE) == "torch" or not INTERPRET or dtype != torch.bfloat16:
            assert torch.equal(a.detach(), master.to(dtype))
    assert idle not in opt.state and torch.equal(idle.detach(), idle_before)


def test_state_dict_round_trip_keeps_float32_state():
    """A MasterAdamW rebuilt from a state dict (as a resumed run does) takes the next step exactly as the
    original: masters and moments come back in float32, not rounded to the parameters' bf16."""
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(64, 33, device=DEVICE).to(torch.bfloat16))
    opt = MasterAdamW([w], lr=1e-2, weight_decay=0.05)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    saved = {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()},
             "param_groups": opt.state_dict()["param_groups"]}
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = MasterAdamW([w2], lr=5.0)  # hyperparameters come from the state dict
    opt2.load_state_dict(saved)
    assert all(opt2.state[w2][k].dtype == torch.float32 for k in ("master", "exp_avg", "exp_avg_sq"))
    assert torch.equal(opt2.state[w2]["master"], opt.state[w]["master"])
    g = torch.randn_like(w)
    w.grad, w2.grad = g, g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(w, w2) and torch.equal(opt.state[w]["master"], opt2.state[w2]["master"])


def test_load_state_dict_names_a_missing_master():
    w = torch.nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))
    opt = MasterAdamW([w])
    w.grad = torch.randn_like(w)
    opt.step()
    sd = opt.state_dict()
    del sd["state"][0]["master"]
    with pytest.raises(ValueError, match=r"lacks \['master'\]"):
        MasterAdamW([torch.nn.Parameter(w.detach().clone())]).load_state_dict(sd)


def test_make_optimizer_picks_by_the_trained_dtype():
    fp32 = torch.nn.Linear(4, 4)
    assert type(make_optimizer(fp32, 1e-3, 0.0, 10)[0]) is torch.optim.AdamW
    bf16 = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert type(make_optimizer(bf16, 1e-3, 0.0, 10)[0]) is MasterAdamW
    mixed = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"mix dtypes .*1\.weight \(torch\.bfloat16\)"):
        make_optimizer(mixed, 1e-3, 0.0, 10)
    with pytest.raises(ValueError, match="float32 parameter"):
        MasterAdamW(fp32.parameters())


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_are_named(impl):
    inputs = CONTRACTS["adamw_master"].make_inputs(CASE["R3-C257-step7-bf16"], 0, "cpu")
    fn = IMPLS[impl]
    bad = [(dict(grad=inputs["grad"].half()), "grad is torch.float16, param torch.bfloat16"),
           (dict(exp_avg=inputs["exp_avg"].bfloat16()), "exp_avg is torch.bfloat16; the optimizer's state"),
           (dict(master=inputs["master"][:, :100]), r"master has shape \(3, 100\)"),
           (dict(exp_avg_sq=inputs["exp_avg_sq"].t().contiguous().t()), "exp_avg_sq is not contiguous"),
           (dict(param=inputs["param"].to(torch.int16), grad=inputs["grad"].to(torch.int16)),
            "param is torch.int16, not a floating dtype"),
           (dict(step=0), "step=0 must be"),
           (dict(beta2=1.0), "out of range")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            fn(**{**inputs, **change})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_triton_step_at_the_3b_gate_up_shape(dtype):
    """The Triton step at the largest 3B matrix against the reference on the same GPU: float32 state within the
    contract's tolerance, the parameter rounded to nearest bit for bit."""
    case = next(c for c in CONTRACTS["adamw_master"].bench)
    case = type(case)(case.name, case.params, dtype)
    a = CONTRACTS["adamw_master"].make_inputs(case, 0, "cuda")
    b = {k: v.clone() if torch.is_tensor(v) else v for k, v in a.items()}
    adamw_master_triton(**a)
    adamw_master_ref(**b)
    for k in ("master", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(a[k], b[k], rtol=2e-6, atol=2e-6)
    assert torch.equal(a["param"], a["master"].to(dtype))
