"""AdamW for a model trained in bf16 / fp16: float32 master weights kept by the optimizer (mixed precision).

The model holds 16-bit weights and computes with them (bf16 matmuls, no per-step cast), its gradients are 16-bit,
and `MasterAdamW` keeps, per parameter, a float32 master copy beside the two float32 moments. Each step updates the
master with torch.optim.AdamW's arithmetic and writes it back rounded into the parameter, through
`stablelm.ops.adamw_master` (kernels/adamw.py: one Triton pass per parameter on CUDA). Trained state: 2 (weight)
+ 2 (gradient) + 4 (master) + 8 (moments) = 16 bytes per parameter, where a float32 model under torch.autocast
holds 4 + 4 + 8 and, through the backward, the 2-byte bf16 copies autocast made of its weights.

The state dict has torch's AdamW layout plus `master` per parameter; loading keeps every state tensor in float32
(torch's Optimizer.load_state_dict would cast them to the parameter's 16-bit dtype). Under FSDP2 a parameter is a
sharded DTensor: its master and moments are DTensors sharded the same way (what torch.distributed.checkpoint gathers
whole), and each rank updates its own shard.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from . import ops

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
FLOAT32_STATE = ("exp_avg", "exp_avg_sq", "master")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (a view: writing it writes the parameter), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class MasterAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (amsgrad off) over 16-bit parameters, updating float32 master weights that live in the
    optimizer's state (`state[p]["master"]`, made from the parameter at its first step)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        if not (lr >= 0 and eps > 0 and weight_decay >= 0 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"MasterAdamW: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay} out of "
                             f"range")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in SIXTEEN_BIT:
                    raise ValueError(f"MasterAdamW: a {p.dtype} parameter of shape {tuple(p.shape)}; it keeps master "
                                     f"weights for bf16 / fp16 parameters (train float32 ones with torch.optim.AdamW)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MasterAdamW does not take sparse gradients")
                state = self.state[p]
                if not state:
                    # The step count on the host, as torch's single-tensor AdamW keeps it: reading it costs no sync.
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    state["master"] = p.detach().float().contiguous()
                state["step"] += 1
                ops.adamw_master(_local(p), _local(p.grad).contiguous(), _local(state["master"]),
                                 _local(state["exp_avg"]), _local(state["exp_avg_sq"]), group["lr"], beta1, beta2,
                                 group["eps"], group["weight_decay"], int(state["step"].item()))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load (hyperparameters, state by parameter), then the float32 state put back in float32 on
        each parameter's device: the base class casts floating state to the parameter's dtype, which would round
        the masters and moments to 16 bits."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for index, p in zip(saved, params):
            values = state_dict["state"].get(index)
            if values is None:
                continue
            missing = [k for k in FLOAT32_STATE if k not in values]
            if missing:
                raise ValueError(f"MasterAdamW.load_state_dict: the state of parameter {index} lacks {missing}")
            for key in FLOAT32_STATE:
                if values[key].shape != p.shape:
                    raise ValueError(f"MasterAdamW.load_state_dict: {key} of parameter {index} has shape "
                                     f"{tuple(values[key].shape)}, the parameter {tuple(p.shape)}")
                self.state[p][key] = values[key].to(device=p.device, dtype=torch.float32, copy=True).contiguous()
