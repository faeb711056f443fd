"""Training the report model across the processes of a torchrun job (vision/pipeline.py's `train` calls these):

    torchrun --nproc-per-node 4 -m vision.train --batch-size 32 ...     # 4 ranks x 8 studies per step

Outside torchrun (no WORLD_SIZE in the environment and no process group started by the caller) nothing here
starts a process group and training runs exactly as before, in one process.

Process group: stablelm.parallel.init_distributed (NCCL on cuda:LOCAL_RANK, gloo on the CPU, collective timeout
STABLELM_DIST_TIMEOUT seconds).

Wrapping (`wrap`, TrainConfig.data_parallel):
  ddp    DistributedDataParallel over the trained parameters only: frozen weights (the LM, the encoder) and the
         buffers are neither bucketed nor broadcast (they are identical on every rank: read from the same
         checkpoint or drawn from the same seed), no per-step buffer broadcast, find_unused_parameters off (every
         trained tensor takes part in every step).
  fsdp   FSDP2 `fully_shard` on each decoder block (frozen block weights included, so they are split too), then on
         the whole model (embedding, final norm, head, projector, encoder adapters); frozen parameters outside
         the blocks (the encoder) are left out of it and stay replicated. No mixed-precision policy: parameters
         compute in their own dtype, as in one process (precision bf16-mixed: bf16, with MasterAdamW's float32
         masters sharded like the moments).
  auto   fsdp for `--lm-mode full` (a replicated fine-tuned LM plus its AdamW moments is what does not fit one
         GPU), ddp otherwise.

Batches: `--batch-size` is the GLOBAL batch: each rank takes batch_size / world_size studies per step (it must
divide), so the same flags give the same run at any world size. Training order comes from DistributedSampler
(shuffle, seed = TrainConfig.seed, set_epoch every epoch, drop_last=False): the permutation of an epoch is the
same at every world size and rank r takes its positions r, r + W, ..., so global step k always sees the k-th
contiguous chunk of global-batch-size studies, the same studies one process sees at step k. When the training
set size is not a multiple of the world size the sampler pads the last step with the first studies of the
permutation again (at most W - 1 repeats per epoch); only then does the last step of an epoch differ from one
process's.

Loss: one process minimises the mean over the batch's report tokens. A rank's loss is the mean over its own
tokens, and DDP / FSDP average gradients over ranks, which equals the global token mean only if every rank had
as many tokens. So each rank's loss is scaled by world_size * rank_tokens / global_tokens (the count all-reduced
before the forward): the averaged gradient is then exactly d(sum of token losses / global tokens), one process's
gradient, up to float summation order. The logged loss is that global mean (all-reduced).

Randomness: the weights are initialised from the same seed on every rank (and DDP broadcasts rank 0's trained
tensors). Dropout and augmentation draws are per rank: rank 0 continues the single-process stream (and its RNG
state is what a checkpoint keeps), every other rank is reseeded at each epoch from (seed, rank, epoch), so a
resumed run draws as an uninterrupted one at the same world size. With dropout > 0 a run at world size W
therefore differs from one process by design (other masks on the other ranks' studies); with dropout 0 the loss
curves agree within float tolerance.

Validation: the first val_limit studies are split into contiguous shares, one per rank; each rank generates its
share, the (id, reference, hypothesis) samples are all-gathered in rank order and rank 0 scores them once, the
scores broadcast (every rank decides alike whether `best` is written). Under FSDP the parameters are gathered
once for the whole validation (`full_parameters`: a full model per rank while it runs; generation then needs no
collectives, so ranks may run different numbers of decode steps).

Checkpoints: written by rank 0 in the ordinary run-checkpoint format, then a barrier; under FSDP the trained
tensors and AdamW moments are first gathered whole (torch.distributed.checkpoint.state_dict, full_state_dict,
cpu_offload). Nothing in them depends on the world size: a run resumes at any world size (DTensor parameters
take their shard of the full tensors when loaded).
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, Subset

from stablelm import parallel
from vision.report_model import to_device

DATA_PARALLEL = ("auto", "ddp", "fsdp")


@dataclass
class Ranks:
    """Where this process stands: rank / world size, its device, whether a process group is in use, and how the
    model was wrapped ("single", "ddp" or "fsdp"; set by `wrap`)."""
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False
    mode: str = "single"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup(device) -> Ranks:
    """Join torchrun's process group (or the caller's) if there is one; otherwise a plain single process."""
    device = torch.device(device)
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        return Ranks(device=device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type == "cuda" and device.index is not None and local_world > 1:
        raise ValueError(f"--device {device}: under torchrun with {local_world} processes per host give "
                         f"--device cuda (each rank takes cuda:LOCAL_RANK), not one GPU for all")
    device = parallel.init_distributed(device)
    return Ranks(dist.get_rank(), dist.get_world_size(), device, True)


def resolve_mode(mode: str, lm_mode: str) -> str:
    if mode not in DATA_PARALLEL:
        raise ValueError(f"data_parallel={mode!r}: choose one of {DATA_PARALLEL}")
    return ("fsdp" if lm_mode == "full" else "ddp") if mode == "auto" else mode


def per_rank_batch(global_batch: int, ranks: Ranks) -> int:
    if global_batch % ranks.world:
        raise ValueError(f"--batch-size {global_batch} is the global batch (studies per step over all ranks): it "
                         f"must be divisible by the world size {ranks.world}")
    return global_batch // ranks.world


def train_sampler(dataset, ranks: Ranks, seed: int) -> DistributedSampler:
    """The training order (module docstring); also used by one process, so the order is the same at every world
    size. Call set_epoch(epoch) before each epoch."""
    return DistributedSampler(dataset, num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=seed,
                              drop_last=False)


def validation_share(dataset, ranks: Ranks, limit: int | None = None) -> Subset:
    """This rank's contiguous share of the first `limit` studies (all of them without a limit)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return Subset(dataset, range(ranks.rank * n // ranks.world, (ranks.rank + 1) * n // ranks.world))


def seed_rank(ranks: Ranks, seed: int, epoch: int) -> None:
    """Ranks > 0: a fresh dropout / augmentation stream per (seed, rank, epoch); rank 0 keeps its stream."""
    if ranks.rank:
        torch.manual_seed((seed * 1_000_003 + ranks.rank * 10_007 + epoch) % (1 << 63))


# ---------------------------------------------------------------- wrapping
def wrap(model: nn.Module, ranks: Ranks, mode: str = "auto") -> nn.Module:
    """The module to call for the training loss: `model` itself in one process, DDP around it, or `model`
    sharded in place by FSDP2 (module docstring). The optimizer is built over `model`'s parameters afterwards."""
    mode = resolve_mode(mode, model.config.lm_mode)
    if not ranks.distributed:
        ranks.mode = "single"
        return model
    ranks.mode = mode
    if mode == "fsdp":
        shard(model, ranks)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignore = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    # The buffers are ignored above (so not synced at init either); no buffer sync before each forward.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(model, device_ids=[ranks.device] if ranks.device.type == "cuda" else None,
               find_unused_parameters=False, **no_sync)


def shard(model: nn.Module, ranks: Ranks) -> None:
    """FSDP2: every decoder block, then the root (frozen parameters outside the blocks left replicated)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    in_blocks = set()
    for block in model.lm.layers:
        in_blocks.update(id(p) for p in block.parameters())
        fully_shard(block, mesh=mesh)
    frozen = {p for p in model.parameters() if not p.requires_grad and id(p) not in in_blocks}
    fully_shard(model, mesh=mesh, ignored_params=frozen or None)


def fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_parameters(model: nn.Module, ranks: Ranks):
    """Under FSDP: every parameter gathered whole on every rank for the block (one all-gather per sharded module,
    none while it runs), sharded again after; elsewhere nothing to do. Every rank must enter it."""
    if ranks.mode != "fsdp":
        yield
        return
    modules = fsdp_modules(model)
    for m in modules:
        m.unshard()
    model.set_reshard_after_forward(False)  # recurses into the blocks
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # fully_shard's defaults: blocks True, root False


# ---------------------------------------------------------------- the step
def label_count(model: nn.Module, reports: list[str]) -> int:
    """Report tokens (with the end token) the loss averages over: the positions with a label."""
    return int(model.tokenize_reports(reports, "cpu")[1].sum())


def step_loss(wrapped: nn.Module, model: nn.Module, batch: dict, ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to call backward on, the global batch's mean token loss, detached, for logging). Across ranks the
    first is this rank's token mean scaled by world * rank_tokens / global_tokens (module docstring)."""
    device = ranks.device
    # to_device: a pinned copy that does not wait for the GPU (the loader already pins its batches on CUDA); the
    # image mask stays on the CPU, where encoder_features reads it.
    images = to_device(batch["images"], device).to(model.lm.dtype)
    if not ranks.distributed:
        loss = wrapped(images, batch["reports"], batch["image_mask"])
        return loss, loss.detach()
    count = label_count(model, batch["reports"])
    total = torch.tensor([float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    loss = wrapped(images, batch["reports"], batch["image_mask"])
    logged = loss.detach().double() * count
    dist.all_reduce(logged)
    return loss * (ranks.world * count / total.to(loss.dtype)), (logged / total).to(loss.dtype)[0]


# ---------------------------------------------------------------- checkpoints
def gathered_state(model: nn.Module, optimizer, ranks: Ranks) -> tuple[dict | None, dict | None]:
    """Under FSDP: (trained tensors, AdamW state by parameter name) gathered whole onto rank 0's CPU (collective:
    every rank calls it; the others get empty dicts); (None, None) elsewhere (the model holds them whole)."""
    if ranks.mode != "fsdp":
        return None, None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    trained = {k: v for k, v in get_model_state_dict(model, options=options).items() if k in names}
    state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return trained, state


def like_parameter(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor in `param`'s layout: its shard when `param` is an FSDP2 DTensor (every rank holds the full
    tensor, so each takes its piece locally), else unchanged. The value keeps its dtype: a float32 master weight of
    a bf16 parameter stays float32."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None)


def gather_objects(items: list) -> list:
    """Every rank's `items`, concatenated in rank order, on every rank (a plain copy without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def broadcast_object(value):
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
