"""ResNet C4 backbone in Caffe style: frozen batch norm as an affine, stride on the 1x1 conv, ceil-mode stem pool.

Parameter names follow detectron2 (``stem.conv1.weight``, ``res4.3.conv2.norm.running_var``, ...) so that both
published checkpoints map onto this module by name.

Batching images of different sizes pads them; to keep each image's result independent of its batch, every layer
that could see the padding (the stem pool, each 3x3 conv, and the res4 output read by the RPN and ROI pooling) sees
it zeroed, which is exactly what the image alone sees through zero padding. All zeroed tensors follow a ReLU, so a
zero never wins a max-pool over real values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from feature_extraction.config import DetectorConfig

Sizes = list[tuple[int, int]]  # per image (height, width) of the valid region of a feature map


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics and affine parameters (Caffe BatchNorm + Scale, use_global_stats)."""

    def __init__(self, channels: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel (scale, shift) this norm applies: y = x * scale + shift."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale


class ConvBN(nn.Module):
    """A bias-free convolution followed by a frozen batch norm, run as one convolution with the norm folded in."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
                 dilation: int = 1, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.norm = FrozenBatchNorm(out_channels, eps=eps)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.norm.scale_shift()
        weight = self.weight * scale.reshape(-1, 1, 1, 1)
        return F.conv2d(x, weight, shift, self.stride, self.padding, self.dilation)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1, 3x3, 1x1) with a projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int, *, stride: int,
                 dilation: int, stride_in_1x1: bool, eps: float) -> None:
        super().__init__()
        self.shortcut = (ConvBN(in_channels, out_channels, 1, stride=stride, eps=eps)
                         if in_channels != out_channels or stride != 1 else None)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        # Which resolution the 3x3 conv reads: the block's output one unless the 3x3 itself strides.
        self.mask_at_input = stride_3x3 != 1
        self.conv1 = ConvBN(in_channels, bottleneck_channels, 1, stride=stride_1x1, eps=eps)
        self.conv2 = ConvBN(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3, padding=dilation,
                            dilation=dilation, eps=eps)
        self.conv3 = ConvBN(bottleneck_channels, out_channels, 1, eps=eps)

    def forward(self, x: torch.Tensor, mask_in: torch.Tensor | None = None,
                mask_out: torch.Tensor | None = None) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        mask = mask_in if self.mask_at_input else mask_out
        if mask is not None:
            out = out.masked_fill(~mask, 0.0)
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + shortcut)


def make_stage(num_blocks: int, in_channels: int, bottleneck_channels: int, out_channels: int, *, stride: int,
               dilation: int, cfg: DetectorConfig) -> nn.ModuleList:
    """One ResNet stage; only its first block strides."""
    blocks = nn.ModuleList()
    for i in range(num_blocks):
        blocks.append(Bottleneck(in_channels if i == 0 else out_channels, bottleneck_channels, out_channels,
                                 stride=stride if i == 0 else 1, dilation=dilation,
                                 stride_in_1x1=cfg.stride_in_1x1, eps=cfg.bn_eps))
    return blocks


def run_stage(blocks: nn.ModuleList, x: torch.Tensor, mask_in: torch.Tensor | None,
              mask_out: torch.Tensor | None) -> torch.Tensor:
    """Run a stage; the first block may change resolution (mask_in -> mask_out), the others keep mask_out."""
    for i, block in enumerate(blocks):
        x = block(x, mask_in if i == 0 else mask_out, mask_out)
    return x


class Stem(nn.Module):
    """7x7/2 conv, ReLU, 3x3/2 max pool (Caffe: no padding, ceil rounding)."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.conv1 = ConvBN(3, cfg.stem_channels, 7, stride=2, padding=3, eps=cfg.bn_eps)
        self.ceil_mode = cfg.stem_pool_ceil

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        if mask is not None:
            x = x.masked_fill(~mask, 0.0)
        pad = 0 if self.ceil_mode else 1
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=pad, ceil_mode=self.ceil_mode)


def _conv_out(size: int, kernel: int, stride: int, pad: int, ceil: bool = False) -> int:
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pad:  # Caffe/PyTorch: the last window must start inside the input
        out -= 1
    return out


class ResNetC4(nn.Module):
    """Stem + res2..res4 (stride 16), returning res4 features with everything outside each image zeroed."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = Stem(cfg)
        width, out = cfg.width_per_group, cfg.res2_channels
        self.res2 = make_stage(cfg.blocks[0], cfg.stem_channels, width, out, stride=1, dilation=1, cfg=cfg)
        self.res3 = make_stage(cfg.blocks[1], out, 2 * width, 2 * out, stride=2, dilation=1, cfg=cfg)
        self.res4 = make_stage(cfg.blocks[2], 2 * out, 4 * width, 4 * out, stride=2, dilation=1, cfg=cfg)

    def level_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Valid (h, w) after the stem conv, res2, res3 and res4 for an input of height x width."""
        pool_pad = 0 if self.cfg.stem_pool_ceil else 1
        sizes, (h, w) = [], (height, width)
        h, w = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)
        sizes.append((h, w))
        h, w = (_conv_out(h, 3, 2, pool_pad, self.cfg.stem_pool_ceil),
                _conv_out(w, 3, 2, pool_pad, self.cfg.stem_pool_ceil))
        sizes.append((h, w))
        for _ in range(2):  # res3, res4: stride 2 (a 1x1 without padding, or a 3x3 with padding 1: same size)
            h, w = _conv_out(h, 1, 2, 0), _conv_out(w, 1, 2, 0)
            sizes.append((h, w))
        return sizes

    def forward(self, x: torch.Tensor, image_sizes: Sizes) -> tuple[torch.Tensor, Sizes]:
        """``x`` [B, 3, H, W] padded batch; ``image_sizes`` each image's (h, w). Returns res4 and its valid sizes."""
        levels = [self.level_sizes(h, w) for h, w in image_sizes]
        stem_shape = (_conv_out(x.shape[2], 7, 2, 3), _conv_out(x.shape[3], 7, 2, 3))
        x = self.stem(x, _valid_mask([lv[0] for lv in levels], stem_shape, x.device))
        mask2 = _valid_mask([lv[1] for lv in levels], x.shape[2:], x.device)
        x = run_stage(self.res2, x, mask2, mask2)
        mask3 = _valid_mask([lv[2] for lv in levels], _strided(x.shape[2:]), x.device)
        x = run_stage(self.res3, x, mask2, mask3)
        mask4 = _valid_mask([lv[3] for lv in levels], _strided(x.shape[2:]), x.device)
        x = run_stage(self.res4, x, mask3, mask4)
        if mask4 is not None:
            x = x.masked_fill(~mask4, 0.0)
        return x, [lv[3] for lv in levels]


def _strided(shape: torch.Size) -> tuple[int, int]:
    return _conv_out(shape[0], 1, 2, 0), _conv_out(shape[1], 1, 2, 0)


def _valid_mask(sizes: Sizes, shape, device: torch.device) -> torch.Tensor | None:
    """[B, 1, H, W] bool, True inside each image's valid region; None when no image is padded at this level."""
    height, width = int(shape[0]), int(shape[1])
    if all(h == height and w == width for h, w in sizes):
        return None
    hs = torch.tensor([h for h, _ in sizes], device=device).reshape(-1, 1, 1, 1)
    ws = torch.tensor([w for _, w in sizes], device=device).reshape(-1, 1, 1, 1)
    rows = torch.arange(height, device=device).reshape(1, 1, -1, 1)
    cols = torch.arange(width, device=device).reshape(1, 1, 1, -1)
    return (rows < hs) & (cols < ws)
