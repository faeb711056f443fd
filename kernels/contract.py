"""Op contracts: what every implementation of an op must satisfy, written once and checked the same way for all.

Each kernel file holds, beside its op's reference, a `CONTRACT` (or `CONTRACTS`, one per op) built from the pieces
here: the shape grid that matters for the op, the dtypes with their tolerances, whether gradients are compared,
and an input generator. tests/test_contracts.py turns every case into a test for every registered implementation,
and `python -m stablelm check-op` (stablelm/oplab.py) runs the same cases against a new function, so a new
implementation gets exactly the checks the shipped ones pass.

A case runs one seed at a time: `make_inputs(case, seed, device)` builds fresh random inputs (never zeros: a
kernel that reads the wrong element, or nothing, must show up), once for the reference and once for the candidate
(implementations may work in place, so neither sees the other's tensors, and views keep their layout). Required
arguments go in by position and defaulted ones by keyword, as stablelm/ops.py calls them. The outputs compared are
`contract.outputs(result, inputs)` (for an op that writes into an argument, such as the KV cache, that argument),
each against the reference's: same shape, same dtype (a silent upcast fails), finite where the reference is, and
|out - ref| <= atol + rtol * |ref| element by element. Gradient cases also compare the gradients of the contract's
`grad_inputs` for random upstream gradients on every output.

Grids: `grid("cpu")` is the small set run in CI through the Triton interpreter (each interpreted call costs a
few tenths of a second); `grid("full")` (every case) is what a GPU runs.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FLOAT_DTYPES = tuple(DTYPE_NAMES)


@dataclass(frozen=True)
class Tol:
    """Element-wise tolerance: |out - ref| <= atol + rtol * |ref|. With of_max, atol is relative to the tensor's
    largest reference value (atol * max(1, max |ref|)): for results that are sums of many rounded terms (16-bit
    attention gradients), whose error follows the size of the terms, not of the (possibly cancelled) result."""
    atol: float
    rtol: float
    of_max: bool = False


@dataclass(frozen=True)
class Case:
    """One point of an op's grid. `name` is unique within the contract (the pytest id and check-op's row)."""
    name: str
    params: dict
    dtype: torch.dtype
    grad: bool = False
    cpu: bool = False  # also in the small CPU grid (every case is in the full grid)


@dataclass
class Contract:
    """The checks of one op. `reference` is the op's reference implementation, whose signature every
    implementation shares; `make_inputs(case, seed, device) -> {parameter name: value}` for every parameter."""
    op: str
    reference: Callable
    make_inputs: Callable[[Case, int, Any], dict]
    cases: list
    tol: dict                    # dtype -> Tol, forward outputs
    grad_tol: dict | None = None  # dtype -> Tol, gradients (None: the op is inference-only)
    grad_inputs: tuple = ()      # parameter names whose gradients grad cases compare
    outputs: Callable | None = None  # (result, inputs) -> {name: tensor}; default: the returned tensor(s)
    bench: list = field(default_factory=list)  # cases at the StableLM-3B shapes for the speed check (GPU)
    work: Callable | None = None  # inputs -> {"bytes": minimal bytes moved, "flops": useful flops} of one call

    def __post_init__(self):
        names = [c.name for c in self.cases] + [c.name for c in self.bench]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"{self.op}: duplicate case names {dup}")
        for c in self.cases:
            if c.dtype not in self.tol or (c.grad and (self.grad_tol is None or c.dtype not in self.grad_tol)):
                raise ValueError(f"{self.op}: case {c.name} has no tolerance for {c.dtype}")

    def grid(self, name: str = "cpu") -> list:
        if name == "cpu":
            return [c for c in self.cases if c.cpu]
        if name == "full":
            return list(self.cases)
        raise ValueError(f"unknown grid {name!r}: 'cpu' or 'full'")

    def case(self, name: str) -> Case:
        for c in self.cases + self.bench:
            if c.name == name:
                return c
        raise KeyError(f"{self.op} has no case {name!r}")

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.reference)


# ----------------------------------------------------------------------------------------------------------------
# Grid and input helpers for the contracts in the kernel files

def case_name(dtype: torch.dtype, grad: bool = False, **params) -> str:
    """'D80-R20-S7-bf16[-grad]' from params in the order given (booleans by name when true, dropped when false)."""
    parts = []
    for k, v in params.items():
        if isinstance(v, bool):
            if v:
                parts.append(k)
        elif v is not None:
            parts.append(f"{k}{v}")
    parts.append(DTYPE_NAMES[dtype])
    if grad:
        parts.append("grad")
    return "-".join(parts)


def make_cases(grid: list, dtypes, grad=(False,), cpu=()) -> list:
    """Cases for every (params dict in grid) x dtype x grad. `cpu` names the cases of the CPU grid; a name that
    matches no case is an error (a typo must not silently shrink CI)."""
    out = []
    for params in grid:
        for dtype in dtypes:
            for g in grad:
                name = case_name(dtype, g, **params)
                out.append(Case(name, dict(params), dtype, g, name in cpu))
    missing = sorted(set(cpu) - {c.name for c in out})
    if missing:
        raise ValueError(f"CPU grid names no case: {missing}")
    return out


def generator(case: Case, seed: int) -> torch.Generator:
    """A CPU generator seeded from the case name and the seed, so every case draws different numbers."""
    h = 0
    for ch in f"{case.name}/{seed}":
        h = (h * 131 + ord(ch)) % (2 ** 61 - 1)
    return torch.Generator().manual_seed(h)


def randn(gen: torch.Generator, *shape, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Gaussian values drawn on the CPU (the same on every device), rounded to dtype, on device. Exact zeros (which
    rounding can make) are nudged, so a kernel that leaves an output untouched cannot match by luck."""
    t = torch.randn(*shape, generator=gen) * scale
    t = t.to(dtype)
    t = torch.where(t == 0, torch.full_like(t, scale * 1e-2), t)
    return t.to(device)


def randint(gen: torch.Generator, low: int, high: int, shape, device="cpu", dtype=torch.int32) -> torch.Tensor:
    """Integers in [low, high) drawn on the CPU."""
    return torch.randint(low, high, tuple(shape), generator=gen).to(dtype).to(device)


def rope_tables(gen: torch.Generator, B: int, S: int, rotary_dim: int, device="cpu", max_pos: int = 4096,
                base: float = 10000.0):
    """cos, sin [B, S, rotary_dim / 2] float32 at random per-token positions (as left padding or a decode offset
    gives), so a kernel reading the wrong token's angle is caught."""
    pos = torch.randint(0, max_pos, (B, S), generator=gen).float()
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = pos[..., None] * inv_freq
    return freqs.cos().to(device), freqs.sin().to(device)


# ----------------------------------------------------------------------------------------------------------------
# Running and comparing

@dataclass
class Check:
    """One compared tensor of one case (worst over the seeds run)."""
    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0   # max |out - ref| / (|ref| + atol)
    tol_used: float = 0.0  # max |out - ref| / (atol + rtol * |ref|): <= 1 passes
    atol: float = 0.0
    rtol: float = 0.0
    ok: bool = True
    problem: str = ""      # shape / dtype / non-finite mismatch, in words


@dataclass
class CaseResult:
    case: Case
    seeds: list
    checks: list = field(default_factory=list)
    error: str = ""  # the implementation raised (first line of the exception)
    device_lost: bool = False  # what it raised was a device fault (e.g. an illegal address): the context is gone

    @property
    def passed(self) -> bool:
        return not self.error and all(c.ok for c in self.checks)

    def row(self) -> dict:
        """One report row: the worst compared tensor of the case."""
        worst = max(self.checks, key=lambda c: (not c.ok, c.tol_used), default=None)
        row = {"case": self.case.name, "dtype": DTYPE_NAMES[self.case.dtype], "grad": self.case.grad,
               "seeds": len(self.seeds), "status": "pass" if self.passed else "FAIL"}
        if worst is not None:
            row.update(worst=worst.name, max_abs=worst.max_abs, max_rel=worst.max_rel, atol=worst.atol,
                       rtol=worst.rtol, tol_used=worst.tol_used)
        row["problem"] = self.error or "; ".join(f"{c.name}: {c.problem}" for c in self.checks if c.problem) or (
            "" if self.passed else f"{worst.name} out of tolerance")
        return row

    def to_json(self) -> dict:
        return {**self.row(), "params": self.case.params,
                "checks": [dict(vars(c)) for c in self.checks]}


def compare(name: str, out, ref: torch.Tensor, tol: Tol) -> Check:
    """Check out against ref (see the module docstring)."""
    c = Check(name, atol=tol.atol, rtol=tol.rtol)
    if not isinstance(out, torch.Tensor):
        c.ok, c.problem = False, f"returned {type(out).__name__}, expected a tensor"
        return c
    if tuple(out.shape) != tuple(ref.shape):
        c.ok, c.problem = False, f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
        return c
    if out.dtype != ref.dtype:
        c.ok, c.problem = False, f"dtype {out.dtype}, expected {ref.dtype}"
    if out.device != ref.device:
        c.ok, c.problem = False, f"on {out.device}, expected {ref.device}"
        return c
    o, r = out.detach().double(), ref.detach().double()
    if o.numel() == 0:
        return c
    if tol.of_max:
        finite_ref = r[torch.isfinite(r)]
        c.atol = tol.atol * max(1.0, float(finite_ref.abs().max()) if finite_ref.numel() else 0.0)
    finite = torch.isfinite(r)
    bad = finite & ~torch.isfinite(o)
    if bad.any():
        c.ok = False
        c.problem = c.problem or f"{int(bad.sum())} non-finite values where the reference is finite"
    err = torch.where(finite, (o - r).abs(), torch.zeros_like(r))
    err = torch.where(bad, torch.full_like(err, math.inf), err)
    c.max_abs = float(err.max())
    c.max_rel = float((err / (r.abs() + c.atol)).max())
    c.tol_used = float((err / (c.atol + tol.rtol * r.abs())).max())
    if c.tol_used > 1.0:
        c.ok = False
    return c


def merge(a: Check, b: Check) -> Check:
    """The worse of two seeds' checks of one tensor."""
    worst = b if (not b.ok, b.tol_used) > (not a.ok, a.tol_used) else a
    return Check(a.name, max(a.max_abs, b.max_abs), max(a.max_rel, b.max_rel), max(a.tol_used, b.tol_used),
                 a.atol, a.rtol, a.ok and b.ok, worst.problem or a.problem or b.problem)


def call(fn: Callable, signature: inspect.Signature, inputs: dict):
    """fn with required arguments by position and defaulted ones by keyword, as stablelm/ops.py calls it."""
    args, kwargs = [], {}
    for p in signature.parameters.values():
        if p.name not in inputs:
            continue
        if p.default is inspect.Parameter.empty:
            args.append(inputs[p.name])
        else:
            kwargs[p.name] = inputs[p.name]
    return fn(*args, **kwargs)


def _outputs(contract: Contract, result, inputs: dict) -> dict:
    if contract.outputs is not None:
        return contract.outputs(result, inputs)
    if isinstance(result, (tuple, list)):
        return {f"out{i}": r for i, r in enumerate(result)}
    return {"out": result}


def _run(contract: Contract, fn: Callable, case: Case, seed: int, device):
    """(outputs, grads) of fn on the case's inputs for `seed`."""
    inputs = contract.make_inputs(case, seed, device)
    if not case.grad:
        with torch.no_grad():
            return _outputs(contract, call(fn, contract.signature, inputs), inputs), {}
    leaves = {}
    for name in contract.grad_inputs:
        t = inputs.get(name)
        if isinstance(t, torch.Tensor):
            # A leaf that keeps the generated layout (strides of a view included): grads land on it directly.
            inputs[name] = leaves[name] = t.detach().requires_grad_()
    with torch.enable_grad():
        outs = _outputs(contract, call(fn, contract.signature, inputs), inputs)
        gen = generator(case, seed + 10_000)
        loss = 0.0
        for name in sorted(outs):
            o = outs[name]
            if isinstance(o, torch.Tensor) and o.requires_grad:
                g = randn(gen, *o.shape, device=o.device)
                loss = loss + (o.float() * g).sum()
        grads = {}
        if isinstance(loss, torch.Tensor):
            got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            grads = {f"d{n}": g for n, g in zip(leaves, got)}
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in outs.items()}, grads


# Errors after which the CUDA context is unusable: every later call fails with the same error.
DEVICE_FAULTS = tuple(t for t in (getattr(torch, "AcceleratorError", None),) if t is not None)


def run_case(contract: Contract, fn: Callable, case: Case, seeds=(0,), device="cpu",
             reference_runs: dict | None = None) -> CaseResult:
    """Run one case of `contract` for `fn` against the reference on every seed; never raises for fn's errors.
    reference_runs: a dict to keep the reference's results in, for checking several implementations."""
    result = CaseResult(case, list(seeds))
    checks: dict = {}
    for seed in seeds:
        key = (contract.op, case.name, seed, str(device))
        if reference_runs is not None and key in reference_runs:
            ref_out, ref_grads = reference_runs[key]
        else:
            ref_out, ref_grads = _run(contract, contract.reference, case, seed, device)
            if reference_runs is not None:
                reference_runs[key] = ref_out, ref_grads
        try:
            out, grads = _run(contract, fn, case, seed, device)
            if str(device).startswith("cuda"):
                # A kernel's fault (an out-of-bounds address) is reported asynchronously, at some later CUDA call:
                # without this it would surface in the next case's reference run, naming the wrong case.
                torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - the report names it
            msg = str(e).strip().splitlines()
            result.error = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
            result.device_lost = isinstance(e, DEVICE_FAULTS)
            return result
        found = []
        for name, ref in ref_out.items():
            found.append(compare(name, out.get(name), ref, contract.tol[case.dtype]))
        for name, ref in ref_grads.items():
            got = grads.get(name)
            if ref is None:
                continue
            if got is None:
                found.append(Check(name, ok=False, problem="no gradient (the reference has one)"))
            else:
                found.append(compare(name, got, ref, contract.grad_tol[case.dtype]))
        for c in found:
            checks[c.name] = merge(checks[c.name], c) if c.name in checks else c
    result.checks = list(checks.values())
    return result
