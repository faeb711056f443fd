"""Helpers every kernel file shares: the float dtypes the kernels take, the SM count their launch heuristics use,
the row addressing of kernels/norm.py and kernels/mlp.py, programmatic dependent launch, and the Triton
interpreter's setup.

With TRITON_INTERPRET=1 (read when this module is first imported, which every kernel module does before it defines
a kernel, as Triton itself decides at @triton.jit time whether a kernel is interpreted) every Triton kernel runs on
CPU tensors. Importing this module then also applies the interpreter fix below, so a script run outside pytest
(a researcher stepping through a kernel on a laptop) gets what the tests get.
"""
import functools
import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _fix_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter int()s the 1-element array of a scalar tensor used as a runtime loop bound, which
    NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); give the interpreter's
    tensors an __index__ that reads the single element instead."""
    import triton.runtime.interpreter as interpreter

    if np.lib.NumpyVersion(np.__version__) < "2.4.0" or not hasattr(interpreter, "_patch_lang_tensor"):
        return
    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_with_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_with_index


if INTERPRET:
    _fix_interpreter_for_numpy_2_4()


# Host-side integer helpers for launchers. triton.cdiv / triton.next_power_of_2 are ConstexprFunctions in Triton 3.6:
# each host call imports and unwraps its arguments (~3 us on a CPU core), and a launcher calls them several times per
# launch, in paths (eager decode, short prefills) that are host bound. Same results for the sizes launchers pass.
def cdiv(x: int, y: int) -> int:
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device, interpreted: int) -> int:
    """The device's streaming multiprocessors on CUDA; elsewhere (the interpreter, which has no SMs and runs programs
    one after another) `interpreted`, the count the caller's heuristic should assume there."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return interpreted


# ----------------------------------------------------------------------------------------------------------------
# Programmatic dependent launch (PDL, sm_90 and later)
#
# A decode step is ~290 small kernels in a row, each a few microseconds, and each used to start only after the one
# before had drained and flushed: its launch and ramp (the first weight loads' DRAM latency) were idle time at
# every boundary. A kernel launched with PDL may be scheduled while the kernel before it in the stream still runs.
# The rule that keeps this safe, in every kernel that takes a `PDL` constexpr:
#   - before pdl_wait: no load and no store, only prefetch_l2 (kernels/gemv.py prefetches its weights). A prefetch
#     returns no data and L2 is where every write lands, so a later load still reads the current bytes;
#   - pdl_wait in every program, before any load or store (it returns once the previous kernel has completed and
#     its writes are visible; that kernel waited for its own predecessor, so all earlier ones are done too);
#   - pdl_launch_dependents early: the next kernel's programs may start and issue their own prefetches.
# Without the launch attribute both instructions are no-ops; with PDL=False they are not emitted at all.
# On by default since it was measured (bench/results/pdl_sweep_*_h100_2026-12-07.json, an H100: the batch-1 bf16
# recorded step 2.62 -> 2.43 ms, int8 and batch 8 within 2%, the same bits: tests/test_pdl.py); ops.use(pdl=False),
# or STABLELM_PDL=0 in the environment, turns it off.


def _pdl_default() -> bool:
    return os.environ.get("STABLELM_PDL", "1") != "0"


_PDL = {"on": _pdl_default()}


def set_pdl(on: bool | None) -> None:
    """Turn programmatic dependent launch on or off for later launches (None: the default, on unless the
    environment variable STABLELM_PDL=0 is set)."""
    _PDL["on"] = _pdl_default() if on is None else bool(on)


def pdl_on() -> bool:
    """Whether the PDL switch is on (launches also need a device that supports it: use_pdl)."""
    return _PDL["on"]


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: torch.device) -> bool:
    return device.type == "cuda" and not INTERPRET and torch.cuda.get_device_capability(device)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether a kernel launched now on `device` goes with PDL: the switch is on and the device is a Hopper or
    newer GPU (never in the interpreter)."""
    return _PDL["on"] and _pdl_capable(device)


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the previous kernel in the stream to complete (see the rule above)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """Let the next kernel in the stream start once every program of this one has passed here."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines holding `ptrs` (a tensor of addresses; CUDA only, nothing comes back)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


# ----------------------------------------------------------------------------------------------------------------
# Tiled dequantising matmuls (kernels/quant.py, kernels/nf4.py)

def skinny_split_k(M: int, N: int, k_tiles: int, block_m: int, block_n: int, sms: int) -> int:
    """K splits for a weight-only matmul: skinny M is bound by the weight read, so split K until there are ~4
    programs per SM, keeping >= 2 K tiles per split (and at most 32 splits to sum)."""
    programs = max(1, cdiv(M, block_m) * cdiv(N, block_n))
    return max(1, min(cdiv(4 * sms, programs), k_tiles // 2, 32))


def check_tiles(op: str, block_m: int, block_n: int, block_k: int, split_k: int) -> None:
    """The tilings those kernels accept: block_m 1 (the CUDA-core row kernel) or a power of two >= 16 (tl.dot),
    block_n / block_k powers of two >= 16, split_k >= 1."""
    def pow2(v):
        return v >= 1 and v & (v - 1) == 0

    if not (block_m == 1 or (block_m >= 16 and pow2(block_m))):
        raise ValueError(f"{op}: block_m must be 1 or a power of two >= 16, got {block_m}")
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if not (v >= 16 and pow2(v)):
            raise ValueError(f"{op}: {name} must be a power of two >= 16, got {v}")
    if split_k < 1:
        raise ValueError(f"{op}: split_k must be >= 1, got {split_k}")


# ----------------------------------------------------------------------------------------------------------------
# Row addressing (kernels/norm.py, kernels/mlp.py)

def _merged_stride(sizes, strides):
    """The one stride that walks dims `sizes` in row-major order, 0 if they hold one element, None if none does."""
    stride = expected = None
    for size, st in zip(reversed(sizes), reversed(strides)):
        if size == 1:
            continue
        if stride is None:
            stride = st
        elif st != expected:
            return None
        expected = st * size
    return 0 if stride is None else stride


def row_layout(tensors, per_head=False):
    """Address the rows of same-shaped tensors [..., N] as (m, h): element (m, h, n) of tensor t lives at
    m * sm + h * sh + n * sn. Returns (M, H, [(sm, sh, sn) per tensor]), or None when some tensor's leading dims
    cannot be walked with two strides (or its column offsets would overflow int32).

    Leading dims collapse into m alone when every tensor allows it (H = 1); otherwise, and always with
    per_head, dim -2 is h (a per-head weight is indexed by it) and the dims before it collapse into m.
    """
    shape = tensors[0].shape
    n = shape[-1]
    if any(abs(t.stride(-1)) * (n - 1) >= 2 ** 31 for t in tensors):
        return None
    lead = shape[:-1]
    if not per_head:
        merged = [_merged_stride(lead, t.stride()[:-1]) for t in tensors]
        if all(s is not None for s in merged):
            return math.prod(lead), 1, [(s, 0, t.stride(-1)) for s, t in zip(merged, tensors)]
        # Two or more leading dims here (one dim always merges).
    strides = []
    for t in tensors:
        sm = _merged_stride(lead[:-1], t.stride()[:-2])
        if sm is None:
            return None
        strides.append((sm, t.stride(-2), t.stride(-1)))
    return math.prod(lead[:-1]), lead[-1], strides


def layout_error(op, name, t):
    return ValueError(f"{op}: {name} with shape {tuple(t.shape)} and strides {t.stride()} cannot be addressed as "
                      f"rows with two strides; pass {name}.contiguous()")
