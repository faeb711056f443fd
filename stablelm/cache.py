"""KVCache: preallocated static key/value buffers with per-sequence lengths.

`k` and `v` hold one buffer per layer, each [B, kv_heads, max_len, head_dim]; they never reallocate, so a decode
step has static shapes and can be captured in a CUDA graph. One buffer per layer rather than one [layers, ...]
tensor: a compiled step (torch.compile) writes each in place, while a write through a per-layer view of one
shared tensor is functionalized into a copy of the whole tensor every step (the gpt-fast recipe's peer measured
~11 ms of such copies per 27 ms step at batch 8, bench/results/profile_compile_peer_8x512_2026-12-02e.txt).
`lengths` (int32, on the device) is how many slots each sequence has filled (left padding included); `start` is each sequence's first real slot (its left padding). `host_lengths`
mirrors `lengths` on the host so the overflow check needs no device sync. Inside torch.compile the host mirror
is left alone (a traced Python list would be a guard that changes every step): whoever runs a compiled step
keeps it, as the decode session does with `set_host_length`.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if min(num_layers, batch_size, kv_heads, max_len, head_dim) <= 0:
            raise ValueError("KVCache dimensions must all be positive")
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.k = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers))
        self.v = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers))
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.start = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.host_lengths = [0] * batch_size
        self.max_len = max_len

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int, dtype=torch.float32, device="cpu") -> "KVCache":
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim,
                   dtype=dtype, device=device)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor a step reads or writes in place: the per-layer keys and values, lengths and starts."""
        return [*self.k, *self.v, self.lengths, self.start]

    def check_room(self, n: int) -> None:
        """Raise before a write of n tokens per sequence would pass max_len."""
        if torch.compiler.is_compiling():
            return
        longest = max(self.host_lengths)
        if longest + n > self.max_len:
            raise ValueError(f"KV cache overflow: {longest} tokens cached + {n} new > max_len={self.max_len}; "
                             f"make the cache longer or the prompt/generation shorter")

    def uniform_length(self) -> int:
        """The common length of all sequences; multi-token forwards into a cache need them equal."""
        if len(set(self.host_lengths)) != 1:
            raise ValueError(f"multi-token forward needs equal cached lengths per sequence, got {self.host_lengths}")
        return self.host_lengths[0]

    def advance(self, n: int) -> None:
        self.lengths.add_(n)
        if not torch.compiler.is_compiling():
            self.host_lengths = [x + n for x in self.host_lengths]

    def set_host_length(self, n: int) -> None:
        """Set the host mirror after steps that could not update it (a CUDA-graph replay, a compiled step): every
        sequence holds n slots (decode keeps them equal)."""
        self.host_lengths = [n] * self.batch_size

    def set_start(self, start: torch.Tensor) -> None:
        """Record each sequence's first real slot (left padding) when the prompt is written."""
        self.start.copy_(start.to(device=self.start.device, dtype=torch.int32))

    def reset(self) -> None:
        self.lengths.zero_()
        self.start.zero_()
        self.host_lengths = [0] * self.batch_size

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder sequences along the batch dim in place (beam search keeps the best beams)."""
        index = index.to(self.device)
        filled = max(self.host_lengths)  # slots past the longest sequence hold nothing worth moving
        for buf in (*self.k, *self.v):
            part = buf[:, :, :filled]
            part.copy_(part.index_select(0, index))
        self.lengths.copy_(self.lengths.index_select(0, index))
        self.start.copy_(self.start.index_select(0, index))
        host = index.tolist()
        self.host_lengths = [self.host_lengths[i] for i in host]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
