"""Swin Transformer image encoder written here, with the forward pass of transformers' `SwinModel`.

    encoder = SwinEncoder(swin_base_224())                        # random weights; vision.swin_checkpoint loads
    tokens, pooled = encoder(pixel_values)                        # [B, 49, 1024], [B, 1024] for swin-base 224

Patch embedding (conv + LayerNorm) -> stages of blocks (LayerNorm -> windowed multi-head self-attention with a
relative position bias, every second block on windows shifted by half a window -> residual; LayerNorm -> MLP ->
residual) with patch merging between stages -> final LayerNorm. `pooled` is the mean over the tokens (SwinModel's
pooler_output).

Our parameter layout fuses query/key/value into one `attn.qkv` projection (`lora_targets()` names its query and
value parts). Reading transformers checkpoints and the converted format live in vision/swin_checkpoint.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stablelm.config import IGNORED_HF_KEYS

ACTIVATIONS = {"gelu": nn.GELU}  # transformers' "gelu" is the exact (erf) GELU
# Fixed eps of the patch-embedding and patch-merging LayerNorms: transformers builds them with the nn.LayerNorm
# default, not config.layer_norm_eps.
FIXED_NORM_EPS = 1e-5
# Additive attention mask between tokens of a shifted window that came from different regions of the map; the
# original Swin (and transformers) use -100, not -inf.
SHIFT_MASK_VALUE = -100.0

# Keys of a transformers SwinConfig dict that do not change the encoder's forward pass (masked-image-modeling
# decoder stride, backbone outputs, derived values checked separately, and the head's: the encoder is the same
# under SwinModel and SwinForImageClassification, whose classifier is dropped).
_IGNORED_SWIN_KEYS = {"encoder_stride", "out_features", "out_indices", "stage_names", "path_norm",
                      "num_layers", "hidden_size", "_out_features", "_out_indices",
                      "architectures", "id2label", "label2id", "problem_type", "num_labels"}


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class SwinConfig:
    """Every setting of the encoder. Defaults are those of transformers' SwinConfig (swin-tiny 224)."""
    image_size: int = 224
    patch_size: int = 4
    num_channels: int = 3
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    use_absolute_embeddings: bool = False
    drop_path_rate: float = 0.1  # stochastic depth, training only

    def __post_init__(self):
        self.depths, self.num_heads = list(self.depths), list(self.num_heads)

        def bad(name, why):
            raise ValueError(f"SwinConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("image_size", "patch_size", "num_channels", "embed_dim", "window_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        for name in ("depths", "num_heads"):
            values = getattr(self, name)
            if not values or not all(isinstance(v, int) and v > 0 for v in values):
                bad(name, "must be a non-empty list of positive integers")
        if len(self.depths) != len(self.num_heads):
            bad("num_heads", f"needs one entry per stage (depths has {len(self.depths)})")
        for i, (dim, heads) in enumerate(zip(self.stage_dims, self.num_heads)):
            if dim % heads:
                bad("num_heads", f"stage {i} has width {dim}, not divisible by {heads} heads")
        if self.hidden_act not in ACTIVATIONS:
            bad("hidden_act", f"unsupported; supported: {sorted(ACTIVATIONS)}")
        if not self.mlp_ratio > 0:
            bad("mlp_ratio", "must be > 0")
        if not 0.0 <= self.drop_path_rate < 1.0:
            bad("drop_path_rate", "must be in [0, 1)")

    @property
    def stage_dims(self) -> list[int]:
        return [self.embed_dim * 2 ** i for i in range(len(self.depths))]

    @property
    def num_features(self) -> int:
        """Width of the output tokens."""
        return self.stage_dims[-1]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf: dict) -> "SwinConfig":
        """Build from a transformers SwinConfig dict (config.json). Errors name the offending field."""
        hf = dict(hf)
        if hf.get("model_type", "swin") != "swin":
            raise ValueError(f"config.model_type={hf['model_type']!r}: only 'swin' (Swin Transformer v1) is supported")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            rate = hf.pop(name, 0.0)
            if rate:
                raise ValueError(f"config.{name}={rate!r}: dropout is not supported (must be 0, as in the "
                                 f"published Swin checkpoints)")
        for name in ("image_size", "patch_size"):
            if isinstance(hf.get(name), (list, tuple)):
                side = set(hf[name])
                if len(hf[name]) != 2 or len(side) != 1:
                    raise ValueError(f"config.{name}={hf[name]!r}: only square sizes are supported")
                hf[name] = side.pop()
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: hf.pop(k) for k in list(hf) if k in names}
        derived = {k: hf.pop(k) for k in ("num_layers", "hidden_size") if k in hf}
        unknown = sorted(k for k in hf if k not in IGNORED_HF_KEYS | _IGNORED_SWIN_KEYS)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown} (not part of the Swin encoder's forward pass)")
        cfg = cls(**kw)
        if derived.get("num_layers", len(cfg.depths)) != len(cfg.depths):
            raise ValueError(f"config.num_layers={derived['num_layers']} but depths has {len(cfg.depths)} stages")
        if derived.get("hidden_size", cfg.num_features) != cfg.num_features:
            raise ValueError(f"config.hidden_size={derived['hidden_size']} but embed_dim and depths give "
                             f"{cfg.num_features}")
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SwinConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"SwinConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


def swin_base_224() -> SwinConfig:
    """microsoft/swin-base-patch4-window7-224 (the R2GenGPT encoder): 49 tokens of 1024 features at 224 px."""
    return SwinConfig(image_size=224, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                      window_size=7, drop_path_rate=0.1)


def swin_tiny_test() -> SwinConfig:
    """A small random-weight encoder for CPU tests: 224 px images still give 49 tokens (of 64 features)."""
    return SwinConfig(image_size=224, patch_size=16, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=7,
                      drop_path_rate=0.0)


# ---------------------------------------------------------------------------------------------------- window helpers
def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, num_windows, window * window, C], windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).transpose(2, 3)
    return x.reshape(B, (H // window) * (W // window), window * window, C)


def from_windows(x: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of to_windows: [B, num_windows, window * window, C] -> [B, height, width, C]."""
    B, _, _, C = x.shape
    x = x.view(B, height // window, width // window, window, window, C).transpose(2, 3)
    return x.reshape(B, height, width, C)


def relative_position_index(window: int, table_window: int, device=None) -> torch.Tensor:
    """[N, N] (N = window^2) rows of a (2 * table_window - 1)^2 bias table holding each query/key offset.

    The table is laid out for `table_window` (config.window_size); a window shrunk to a smaller feature map reads
    the offsets it has from the same table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window, device=device), torch.arange(window, device=device),
                                        indexing="ij")).flatten(1)               # [2, N]: (row, col) of each token
    offset = coords[:, :, None] - coords[:, None, :] + (table_window - 1)      # [2, N, N], shifted to >= 0
    return offset[0] * (2 * table_window - 1) + offset[1]


def shift_mask(height: int, width: int, window: int, shift: int, device=None) -> torch.Tensor:
    """[num_windows, N, N] additive mask for windows of a map rolled by -shift: tokens that were not neighbours
    before the roll (the wrapped-around bands) must not attend to each other."""
    def band(n):  # 0: never wrapped, 1: last window's band, 2: the rows/cols that wrapped around
        idx = torch.arange(n, device=device)
        return (idx >= n - window).long() + (idx >= n - shift).long()

    region = (band(height)[:, None] * 3 + band(width)[None, :])[None, :, :, None]   # [1, H, W, 1]
    region = to_windows(region, window)[0, :, :, 0]                                   # [num_windows, N]
    different = region[:, :, None] != region[:, None, :]
    return torch.zeros(different.shape, device=device).masked_fill(different, SHIFT_MASK_VALUE)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for random samples. Same random draw as transformers'
    SwinDropPath (floor(u + keep)), so a seeded training step matches it."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.floor(torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device) + keep)
    return x / keep * mask


# ---------------------------------------------------------------------------------------------------- modules
class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> embed_dim features, then LayerNorm."""

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.patch = cfg.patch_size
        self.proj = nn.Conv2d(cfg.num_channels, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=FIXED_NORM_EPS)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        H, W = pixels.shape[-2:]
        pixels = F.pad(pixels, (0, -W % self.patch, 0, -H % self.patch))  # partial patches see zeros
        x = self.proj(pixels)
        size = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), size


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learned bias per head and relative offset."""

    def __init__(self, dim: int, heads: int, table_window: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)   # [q; k; v] rows
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * table_window - 1) ** 2, heads))

    def forward(self, x: torch.Tensor, position_index: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, num_windows, N, C]; position_index [N, N]; mask [num_windows, N, N] or None."""
        B, nW, N, C = x.shape
        q, k, v = self.qkv(x).view(B, nW, N, 3, self.heads, C // self.heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.bias_table[position_index].permute(2, 0, 1)     # [heads, N, N]
        if mask is not None:
            bias = bias + mask[:, None]                              # [num_windows, heads, N, N]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # [B, nW, heads, N, C/heads]
        return self.proj(out.transpose(2, 3).reshape(B, nW, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, cfg: SwinConfig, dim: int, heads: int, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = WindowAttention(dim, heads, cfg.window_size, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(cfg.mlp_ratio * dim), cfg.hidden_act)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, size: tuple[int, int], window: int, shift: int, position_index: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        H, W = size
        B, L, C = x.shape
        h = self.norm1(x).view(B, H, W, C)
        # Pad the normalised map to whole windows; the zero tokens take part in attention, as in transformers.
        pad_h, pad_w = -H % window, -W % window
        h = F.pad(h, (0, 0, 0, pad_w, 0, pad_h))
        if shift:
            h = torch.roll(h, (-shift, -shift), dims=(1, 2))
        h = from_windows(self.attn(to_windows(h, window), position_index, mask), window, H + pad_h, W + pad_w)
        if shift:
            h = torch.roll(h, (shift, shift), dims=(1, 2))
        x = x + drop_path(h[:, :H, :W].reshape(B, L, C), self.drop_path_rate, self.training)
        # transformers' SwinLayer applies drop path to the attention branch only; so do we.
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Each 2x2 neighbourhood -> one token of twice the width (the map is zero-padded to even sides)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=FIXED_NORM_EPS)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        H, W = size
        B, _, C = x.shape
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))
        # Concatenation order of the four neighbours (row, col): (0, 0), (1, 0), (0, 1), (1, 1).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        size = (x.shape[1], x.shape[2])
        return self.reduction(self.norm(x.reshape(B, size[0] * size[1], 4 * C))), size


class SwinStage(nn.Module):
    def __init__(self, cfg: SwinConfig, index: int, drop_path_rates: list[float]):
        super().__init__()
        dim = cfg.stage_dims[index]
        self.window_size = cfg.window_size
        self.blocks = nn.ModuleList(SwinBlock(cfg, dim, cfg.num_heads[index], rate) for rate in drop_path_rates)
        self.merge = PatchMerging(dim) if index < len(cfg.depths) - 1 else None

    def forward(self, x: torch.Tensor, size: tuple[int, int], checkpointing: bool):
        # A feature map no larger than a window is one window (shrunk to the map) and is never shifted.
        if min(size) <= self.window_size:
            window, shift = min(size), 0
        else:
            window, shift = self.window_size, self.window_size // 2
        position_index = relative_position_index(window, self.window_size, x.device)
        mask = None
        if shift:
            padded = (size[0] + -size[0] % window, size[1] + -size[1] % window)
            mask = shift_mask(*padded, window, shift, x.device)
        for i, block in enumerate(self.blocks):
            args = (size, window, shift, position_index, mask) if i % 2 else (size, window, 0, position_index, None)
            if checkpointing:
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        if self.merge is not None:
            x, size = self.merge(x, size)
        return x, size


class SwinEncoder(nn.Module):
    """pixel_values [B, C, H, W] -> (last_hidden_state [B, L, num_features], pooled [B, num_features])."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = config
        self.num_features = config.num_features
        self.gradient_checkpointing = False  # recompute each block in backward (saves activation memory)
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = (nn.Parameter(torch.zeros(1, config.num_patches, config.embed_dim))
                          if config.use_absolute_embeddings else None)
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(config.depths[:i]) for i in range(len(config.depths))]
        self.stages = nn.ModuleList(SwinStage(config, i, rates[s:s + d])
                                    for i, (s, d) in enumerate(zip(starts, config.depths)))
        self.norm = nn.LayerNorm(config.num_features, eps=config.layer_norm_eps)
        self._init_weights()

    def _init_weights(self):
        # For random-weight encoders (tests, training from scratch); pretrained weights replace all of this.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.bias_table, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"pixel_values must be [batch, {self.config.num_channels}, height, width], got "
                             f"{tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}")
        x, size = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        if self.pos_embed is not None:
            if x.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(f"absolute position embeddings are for {self.config.image_size}px images "
                                 f"({self.pos_embed.shape[1]} patches); got {tuple(pixel_values.shape[-2:])} "
                                 f"({size[0]}x{size[1]} patches)")
            x = x + self.pos_embed
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        for stage in self.stages:
            x, size = stage(x, size, checkpointing)
        x = self.norm(x)
        return x, x.mean(dim=1)

    def lora_targets(self) -> dict[str, list[tuple[int, int]]]:
        """For stablelm.lora.apply_lora: the query and value rows of every fused qkv projection (R2GenGPT puts LoRA
        on the Swin encoder's query and value)."""
        targets = {}
        for i, stage in enumerate(self.stages):
            dim = self.config.stage_dims[i]
            for j in range(len(stage.blocks)):
                targets[f"stages.{i}.blocks.{j}.attn.qkv"] = [(0, dim), (2 * dim, 3 * dim)]
        return targets
