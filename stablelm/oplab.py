"""Kernel lab: is a new implementation of an op right, and is it faster? One call answers both.

    python -m stablelm check-op rotary my_kernels:rotary [--device cpu|cuda] [--seeds N] [--json OUT]
                                [--full] [--case NAME] [--model] [--speed] [--name NAME]

    from stablelm.oplab import check_op
    report = check_op("rotary", my_rotary, model=True)   # -> Report; report.passed, report.table()

Steps, in order:
  1. the function is imported ("module:function" or "path/to/file.py:function") and its signature compared with the
     op's reference (parameter names, order, kinds and defaults; extra trailing parameters need defaults);
  2. the op's contract (kernels/<file>.py CONTRACTS, machinery in kernels/contract.py) runs case by case against the
     reference on fresh random inputs for several seeds, forward and (where the contract says so) gradients: the
     small CPU grid on the CPU, every case on a GPU (or --full);
  3. --model: the function is registered (stablelm.ops.register) and chosen (ops.using) inside a random-weight model
     (tiny on the CPU, the StableLM-3B shape on a GPU), whose fp32 logits and greedy tokens are compared with
     transformers' StableLmForCausalLM on the same weights; on a GPU also bf16 prefill and decode-step times with
     and without it;
  4. --speed (GPU): the op alone at the StableLM-3B shapes against every registered implementation, timed as
     replays of a CUDA graph of many calls, as a fraction of the copy bandwidth / matmul rate measured in the run.
Exit status of the command: 0 when everything checked passed, 1 when something failed (named), 2 for a usage error
(unknown op, import failure, wrong signature, no CUDA for --device cuda).

On the CPU, Triton kernels run through the Triton interpreter, which must be switched on before a kernel is defined:
the command re-executes itself with TRITON_INTERPRET=1 when it is not set; from Python, set it before importing
triton (or stablelm). In the interpreter bf16 tl.dot results are wrong, so the CPU grids check bf16 only for ops
without a matmul (rotary, norm, swiglu); a GPU checks every dtype.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernels.contract import CaseResult, Contract, call, run_case

from . import ops
from .measure import copy_bandwidth_gbs, environment, graph_ms, markdown_table, matmul_tflops, time_cuda


class UsageError(Exception):
    """A mistake in what was asked (exit status 2), as opposed to an implementation that fails its checks."""


# ----------------------------------------------------------------------------------------------------------------
# Finding things

def op_names() -> list:
    return sorted(ops.CUDA_PREFERENCE)


def contract(op: str) -> Contract:
    """The contract of `op`, from the kernels module holding its reference."""
    if op not in ops.CUDA_PREFERENCE:
        raise UsageError(f"unknown op {op!r}; ops are {', '.join(op_names())}")
    module = importlib.import_module(ops.implementation(op, "torch").__module__)
    found = getattr(module, "CONTRACTS", {}).get(op)
    if found is None:
        raise UsageError(f"op {op!r} has no contract in {module.__name__} (CONTRACTS)")
    return found


def load_function(spec: str):
    """The callable named by "package.module:function" or "path/to/file.py:function" (attribute may be dotted)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise UsageError(f"function {spec!r} must be given as MODULE:FUNCTION (or path/to/file.py:FUNCTION)")
    where, attr = spec.split(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise UsageError(f"cannot import {spec!r}: no file {where}")
            name = f"_oplab_{path.stem}"
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to import is the user's to fix
        raise UsageError(f"cannot import {where!r}: {type(e).__name__}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {where!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec!r} is a {type(obj).__name__}, not a function")
    return obj


def signature_problems(op: str, fn) -> list:
    """How fn's signature differs from the op's reference (empty if it matches). The reference's parameters must
    come first with the same names, kinds and defaults (stablelm.ops passes some by keyword); parameters after them
    must have defaults (the op table never passes them)."""
    ref = contract(op).signature
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        return [f"cannot read the signature of {fn!r}: {e}"]
    want, got = list(ref.parameters.values()), list(sig.parameters.values())
    problems = []
    for i, p in enumerate(want):
        if i >= len(got):
            problems.append(f"missing parameter {p.name!r} (position {i})")
            continue
        g = got[i]
        if g.kind in (g.VAR_POSITIONAL, g.VAR_KEYWORD):
            problems.append(f"parameter {i} is {g}, expected {p.name!r}")
            break
        if g.name != p.name:
            problems.append(f"parameter {i} is named {g.name!r}, expected {p.name!r}")
        elif g.kind != p.kind:
            problems.append(f"parameter {p.name!r} is {g.kind.description}, expected {p.kind.description}")
        elif g.default is not p.default and g.default != p.default:
            def show(d):
                return "no default" if d is inspect.Parameter.empty else f"default {d!r}"
            problems.append(f"parameter {p.name!r} has {show(g.default)}, expected {show(p.default)}")
    for g in got[len(want):]:
        if g.kind not in (g.VAR_POSITIONAL, g.VAR_KEYWORD) and g.default is inspect.Parameter.empty:
            problems.append(f"extra parameter {g.name!r} has no default")
    return problems


def expected_signature(op: str) -> str:
    return f"{op}{contract(op).signature}"


# ----------------------------------------------------------------------------------------------------------------
# The report

@dataclass
class Report:
    op: str
    function: str
    device: str
    grid: str
    seeds: int
    cases: list = field(default_factory=list)   # CaseResult
    model: dict | None = None
    speed: dict | None = None
    notes: list = field(default_factory=list)

    @property
    def failed(self) -> list:
        """Names of what failed: contract cases, then model checks ("model:<check>")."""
        out = [r.case.name for r in self.cases if not r.passed]
        if self.model is not None:
            out += [f"model:{c['check']}" for c in self.model["checks"] if not c["passed"]]
        return out

    @property
    def passed(self) -> bool:
        return not self.failed

    def table(self) -> str:
        """Markdown: one row per case (the worst compared tensor over the seeds), then the model and speed parts."""
        lines = [f"check-op {self.op} {self.function} on {self.device} ({self.grid} grid, {len(self.cases)} cases "
                 f"x {self.seeds} seeds)", ""]
        cols = ["case", "dtype", "grad", "worst", "max_abs", "max_rel", "atol", "rtol", "tol_used", "status",
                "problem"]
        lines.append(markdown_table([r.row() for r in self.cases], cols))
        if self.model is not None:
            lines += ["", f"whole model ({self.model['shape']}, {self.model['dtype']}, vs transformers "
                          f"StableLmForCausalLM on the same weights)", ""]
            lines.append(markdown_table(self.model["checks"], ["check", "value", "limit", "reference_impl", "passed"]))
            if self.model.get("speed"):
                lines += ["", markdown_table(self.model["speed"],
                                             ["phase", "shape", "without_ms", "with_ms", "speedup"])]
        if self.speed is not None:
            lines += ["", f"op speed at StableLM-3B shapes (copy {self.speed['copy_gbs']:.0f} GB/s, matmul "
                          f"{self.speed['matmul_tflops']:.0f} TFLOP/s measured in this run)", ""]
            lines.append(markdown_table(self.speed["rows"], ["case", "impl", "ms", "GB/s", "frac_copy", "TFLOP/s",
                                                        "frac_matmul", "vs_best_other", "error"]))
        lines += [""] + [f"note: {n}" for n in self.notes]
        verdict = "PASS" if self.passed else f"FAIL ({len(self.failed)}): " + ", ".join(self.failed)
        lines.append(f"{self.op}: {verdict}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"op": self.op, "function": self.function, "device": self.device, "grid": self.grid,
                "seeds": self.seeds, "passed": self.passed, "failed": self.failed,
                "cases": [r.to_json() for r in self.cases], "model": self.model, "speed": self.speed,
                "notes": self.notes, "environment": environment()}


# ----------------------------------------------------------------------------------------------------------------
# The check

def _resolve_device(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return device


def _label(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def check_op(op: str, fn, device=None, seeds: int = 3, grid: str | None = None, cases=None, model: bool = False,
             speed: bool = False, name: str = "candidate") -> Report:
    """Check `fn` (a callable or "module:function") as an implementation of `op`; see the module docstring.

    grid: "cpu" (default on the CPU) or "full" (default on a GPU); cases: case names (exactly that case) or
    name substrings (every case containing it) to keep.
    name: what fn is registered as in stablelm.ops for the model and speed checks (a function that already is a
    registered implementation keeps its name). Raises UsageError for a usage mistake; a failing implementation
    never raises, it fails cases (report.failed).
    """
    spec = fn if isinstance(fn, str) else None
    con = contract(op)
    fn = load_function(fn) if spec else fn
    if not callable(fn):
        raise UsageError(f"{fn!r} is not callable")
    problems = signature_problems(op, fn)
    if problems:
        raise UsageError(f"{spec or _label(fn)} does not have {op}'s signature {expected_signature(op)}: "
                         + "; ".join(problems))
    device = _resolve_device(device)
    if not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"seeds must be a positive integer, got {seeds!r}")
    grid = grid or ("full" if device.startswith("cuda") else "cpu")
    if grid not in ("cpu", "full"):
        raise UsageError(f"grid must be cpu or full, got {grid!r}")
    selected = con.grid(grid)
    if cases:
        wanted = [cases] if isinstance(cases, str) else list(cases)
        names = {c.name for c in selected}  # a whole case name picks that case alone, not every longer one
        selected = [c for c in selected if any(w == c.name if w in names else w in c.name for w in wanted)]
        if not selected:
            raise UsageError(f"no {grid}-grid case of {op} matches {wanted}")
    report = Report(op, spec or _label(fn), device, grid, seeds)
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        report.notes.append("TRITON_INTERPRET is not 1: Triton kernels cannot run on CPU tensors (the command "
                            "line sets it; from Python set it before importing triton)")
    for i, case in enumerate(selected):
        report.cases.append(run_case(con, fn, case, seeds=range(seeds), device=device))
        if report.cases[-1].device_lost:
            # The device fault ended the CUDA context: the rest cannot run in this process, and must not pass.
            rest = selected[i + 1:]
            report.cases += [CaseResult(c, list(range(seeds)), error=f"not run: case {case.name} lost the "
                                           "CUDA context") for c in rest]
            report.notes.append(f"{case.name} raised a device fault ({report.cases[i].error}); the {len(rest)} "
                                "cases after it were not run (run them alone with --case to check them)")
            model = speed = False
            break
    if model or speed:
        impl_name = _registered_name(op, fn) or name
        if _registered_name(op, fn) is None:
            ops.register(op, impl_name, fn)
        if model:
            report.model = model_verdict(op, impl_name, device)
        if speed:
            if not device.startswith("cuda"):
                report.notes.append("--speed needs a GPU: skipped")
            else:
                report.speed = op_speed(op, impl_name, device)
    return report


def _registered_name(op: str, fn) -> str | None:
    for n in ops.available(op):
        if ops.implementation(op, n) is fn:
            return n
    return None


# ----------------------------------------------------------------------------------------------------------------
# Whole model

def _hf_config(device: str, op: str):
    from transformers import StableLmConfig

    from .config import preset
    if device.startswith("cuda"):
        hf = preset("stablelm-3b-4e1t").to_hf()
        hf.pop("architectures", None)
        hf.pop("model_type", None)
        hf.pop("transformers_version", None)
        return StableLmConfig(**hf), "StableLM-3B shape"
    # Tiny, but with the 3B head geometry (head_dim 80, rotary_dim 20) and GQA (2 query heads per kv head).
    return StableLmConfig(vocab_size=256, hidden_size=320, intermediate_size=864, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.25,
                          max_position_embeddings=128, bos_token_id=1, eos_token_id=2), "tiny"


def _random_pair(device: str, op: str):
    """(transformers model, our model) with the same random fp32 weights on device."""
    from transformers import StableLmForCausalLM

    from .convert import hf_to_project
    from .config import StableLMConfig
    from .model import StableLM

    hf_cfg, shape = _hf_config(device, op)
    hf_cfg._attn_implementation = "eager" if device == "cpu" else "sdpa"
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device(device):
        hf = StableLmForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if p.dim() == 1:  # LayerNorm weights near 1, biases near 0, never exactly
                base = 1.0 if pname.endswith("weight") else 0.0
                p.normal_(base, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.08 if shape == "tiny" else 0.02, generator=gen)
    cfg = StableLMConfig.from_hf(hf_cfg.to_dict())
    with torch.device(device):
        ours = StableLM(cfg).eval()
    ours.load_state_dict(hf_to_project(hf.state_dict(), cfg))
    return hf, ours, shape


def model_verdict(op: str, impl: str, device: str, new_tokens: int = 8) -> dict:
    """fp32 logits (prompt forward, left padded) and greedy tokens (prefill + decode through the cache) of our model
    using implementation `impl` of `op`, against transformers on the same weights; our model with the reference
    ("torch") beside it. quant_linear: the model is int8-quantized and compared with itself on the reference op
    (transformers has no such model); transformers' distance is shown for context."""
    from .generate import generate

    hf, ours, shape = _random_pair(device, op)
    B, S = 2, (24 if device == "cpu" else 256)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, hf.config.vocab_size, (B, S), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    with torch.no_grad():
        hf_logits = hf(ids, attention_mask=mask).logits
        hf_tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[:, S:]
    del hf
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if op == "quant_linear":
        from .quantize import quantize_model
        quantize_model(ours, bits=8)

    def run(name):
        with ops.using(**{op: name}), torch.no_grad():
            logits = ours(ids, attention_mask=mask)
            tokens = generate(ours, ids, attention_mask=mask, max_new_tokens=new_tokens, stop_ids=[])
        return logits, tokens

    valid = mask.bool()
    ref_logits, ref_tokens = run("torch")
    logits, tokens = run(impl)
    scale = hf_logits[valid].abs().max().item()
    # fp32 through the whole model: a few ulp per layer; on a GPU, 32 layers and tf32-level attention products.
    limit = (1e-3 if device.startswith("cuda") else 2e-4) * scale + 1e-5

    def err(a, b):
        return (a[valid] - b[valid]).abs().max().item()

    checks = []
    if op == "quant_linear":
        checks.append(dict(check="logits_vs_reference_op", value=err(logits, ref_logits), limit=limit,
                           reference_impl=0.0, passed=err(logits, ref_logits) <= limit))
        checks.append(dict(check="logits_vs_transformers_float(info)", value=err(logits, hf_logits), limit=None,
                           reference_impl=err(ref_logits, hf_logits), passed=True))
        same = torch.equal(tokens, ref_tokens)
        checks.append(dict(check="greedy_tokens_vs_reference_op", value=f"{_agree(tokens, ref_tokens):.0%} agree",
                           limit="100%", reference_impl="", passed=same))
    else:
        e, e_ref = err(logits, hf_logits), err(ref_logits, hf_logits)
        checks.append(dict(check="logits_vs_transformers", value=e, limit=limit, reference_impl=e_ref,
                           passed=e <= limit))
        # A near tie can flip a random-weight model's greedy token for the reference itself; then the tokens of
        # the reference op are the target instead.
        target = hf_tokens if torch.equal(ref_tokens, hf_tokens) else ref_tokens
        checks.append(dict(check="greedy_tokens_vs_transformers",
                           value=f"{_agree(tokens, hf_tokens):.0%} agree", limit="100%" if target is hf_tokens else
                           "reference op's tokens", reference_impl=f"{_agree(ref_tokens, hf_tokens):.0%} agree",
                           passed=torch.equal(tokens, target)))
    verdict = {"shape": shape, "dtype": "fp32", "impl": impl, "prompt": [B, S], "new_tokens": new_tokens,
               "checks": checks, "passed": all(c["passed"] for c in checks)}
    if device.startswith("cuda"):
        verdict["speed"] = model_speed(ours, op, impl)
    return verdict


def _agree(a, b) -> float:
    return (a == b).float().mean().item() if a.shape == b.shape else 0.0


def model_speed(model, op: str, impl: str, prompt: int = 2048, batch: int = 8, context: int = 1024) -> list:
    """bf16 prefill (batch 1, `prompt` tokens) and CUDA-graph decode step (batch `batch` at `context` cached
    tokens) times with the device default implementation of `op` and with `impl`."""
    from .graph import GraphDecodeStep

    model = model.to(torch.bfloat16)
    device = model.device
    torch.cuda.empty_cache()
    gen = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    rows = []
    default = ops.current(op, device.type)
    for phase in ("prefill", "decode"):
        row = {"phase": phase, "shape": f"B1 S{prompt}" if phase == "prefill" else f"B{batch} ctx{context}"}
        for key, name in (("without_ms", default), ("with_ms", impl)):
            with ops.using(**{op: name}), torch.no_grad():
                if phase == "prefill":
                    ids = torch.randint(0, vocab, (1, prompt), generator=gen).to(device)
                    cache = model.make_cache(1, prompt)

                    def once():
                        cache.reset()
                        model.prefill(cache, ids)
                    row[key] = time_cuda(once)
                else:
                    ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
                    steps = 16
                    cache = model.make_cache(batch, context + 3 + steps * 8)
                    model.prefill(cache, ids)
                    step = GraphDecodeStep(model, cache)
                    tok = ids[:, -1:]
                    step(tok)  # capture (with this implementation chosen)
                    row[key] = _step_ms(step, tok, steps)
                del cache
        row["speedup"] = row["without_ms"] / row["with_ms"]
        row["without"] = default
        rows.append(row)
    return rows


def _step_ms(step, tok, steps: int) -> float:
    """Median ms of one replayed decode step over a few rounds of `steps` steps."""
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step(tok)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------------------------------
# Timing (CUDA)

def op_speed(op: str, impl: str, device: str = "cuda") -> dict:
    """Every registered implementation of `op` (impl among them) on the contract's StableLM-3B bench cases."""
    con = contract(op)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    result = {"copy_gbs": copy_bandwidth_gbs(), "matmul_tflops": matmul_tflops(), "rows": [], "impl": impl}
    for case in con.bench:
        first = con.make_inputs(case, 0, device)
        nbytes = sum(t.nbytes for t in first.values() if isinstance(t, torch.Tensor))
        copies = max(1, min(8, math.ceil(3 * l2 / max(nbytes, 1))))
        input_sets = [first] + [con.make_inputs(case, s, device) for s in range(1, copies)]
        work = con.work(first) if con.work else {}
        rows = []
        for name in ops.available(op):
            fn = ops.implementation(op, name)
            row = {"case": case.name, "impl": name}
            try:
                ms = graph_ms([lambda inp=inp: call(fn, con.signature, inp) for inp in input_sets])
            except Exception as e:  # noqa: BLE001 - one failing implementation is a row, not the end
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
                rows.append(row)
                continue
            row["ms"] = ms
            if "bytes" in work:
                row["GB/s"] = work["bytes"] / ms / 1e6
                row["frac_copy"] = row["GB/s"] / result["copy_gbs"]
            if "flops" in work:
                row["TFLOP/s"] = work["flops"] / ms / 1e9
                row["frac_matmul"] = row["TFLOP/s"] / result["matmul_tflops"]
            rows.append(row)
        others = [r["ms"] for r in rows if r["impl"] != impl and "ms" in r]
        for r in rows:
            if r["impl"] == impl and "ms" in r and others:
                r["vs_best_other"] = min(others) / r["ms"]  # > 1: faster than every other implementation
        result["rows"] += rows
        del input_sets, first
    return result


# ----------------------------------------------------------------------------------------------------------------
# Command line (python -m stablelm check-op)

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("op", help=f"the op: {', '.join(op_names())}")
    p.add_argument("function", help="MODULE:FUNCTION or path/to/file.py:FUNCTION")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--seeds", type=int, default=3, help="random input draws per case (default 3)")
    p.add_argument("--full", action="store_true", help="every case of the contract (default on cuda; the CPU runs "
                                                         "a small grid)")
    p.add_argument("--case", action="append", help="only this case (its whole name), or the cases whose name "
                                                   "contains this (repeatable)")
    p.add_argument("--model", action="store_true", help="also the whole-model verdict against transformers")
    p.add_argument("--speed", action="store_true", help="also the op's speed against every implementation (GPU)")
    p.add_argument("--name", default="candidate", help="name to register the function under (model, speed)")
    p.add_argument("--json", metavar="OUT", help="write the whole report as JSON")


def _needs_interpreter(device) -> bool:
    return (device == "cpu" or (device is None and not torch.cuda.is_available())) and \
        os.environ.get("TRITON_INTERPRET") != "1"


def run(args, argv=None) -> int:
    """The check-op command. argv: the `python -m ...` arguments that started it (["stablelm", "check-op", ...]),
    so it can re-execute itself under the Triton interpreter."""
    if _needs_interpreter(args.device) and argv is not None and not os.environ.get("_STABLELM_OPLAB_REEXEC"):
        # Triton decides at @triton.jit time whether a kernel is interpreted, and stablelm's package import has
        # already defined the shipped kernels: start again with the interpreter on.
        env = dict(os.environ, TRITON_INTERPRET="1", _STABLELM_OPLAB_REEXEC="1")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", *argv], env)
    try:
        report = check_op(args.op, args.function, device=args.device, seeds=args.seeds,
                          grid="full" if args.full else None, cases=args.case, model=args.model, speed=args.speed,
                          name=args.name)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_json(), indent=2, default=str))
    if not report.passed:
        print(f"error: {len(report.failed)} failed: {', '.join(report.failed)}", file=sys.stderr)
    return 0 if report.passed else 1


def main(argv=None) -> int:
    """`python -m stablelm.oplab OP MODULE:FUNCTION ...`, the same as `python -m stablelm check-op ...`."""
    p = argparse.ArgumentParser(prog="python -m stablelm check-op", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(p.parse_args(argv), ["stablelm.oplab", *argv])


if __name__ == "__main__":
    sys.exit(main())
