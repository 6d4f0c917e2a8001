"""The encoder and decoder networks and their blocks, named as in the checkpoint (`encoder.down.0.block.0...`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VAEConfig

def _swish(x: Tensor) -> Tensor:
    # Written out rather than F.silu: the fused kernel rounds differently, and this form
    # reproduces the reference bit for bit.
    return x * torch.sigmoid(x)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """(GroupNorm, SiLU, conv3x3) twice, plus a residual (1x1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (used only in the mid block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C), made contiguous in that layout:
        # the same values in another memory layout give a (1e-6) different SDPA result.
        q, k, v = (
            proj(y).permute(0, 2, 3, 1).reshape(b, 1, h * w, c).contiguous() for proj in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Pad only right/bottom: this is what the checkpoint was trained with
        # (a symmetric padding=1 conv would shift the sampling grid by one pixel).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), then an optional down/upsample.

    An empty container keeps the checkpoint's names (`down.{i}.block.{j}`, `down.{i}.downsample`).
    """

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


# --------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        n_levels = len(cfg.ch_mult)
        block_in = cfg.ch if cfg.family == "nextstep-1" else cfg.ch * cfg.ch_mult[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, block_in, 3, padding=1)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            # Every level but the last halves the resolution.
            down = Downsample(block_in) if i != n_levels - 1 else None
            self.down.append(Level(blocks, down, "downsample"))
        self.mid = MidBlock(block_in)
        self.norm_out = _group_norm(block_in)
        # Twice z_channels: mean and log-variance.
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        n_levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        # Built from the lowest resolution up, but stored so that `up.{i}` mirrors `down.{i}`
        # (the checkpoint's numbering); forward therefore walks `up` in reverse.
        levels: list[Level] = []
        for i in reversed(range(n_levels)):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            up = Upsample(block_in) if i != 0 else None
            levels.insert(0, Level(blocks, up, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))
