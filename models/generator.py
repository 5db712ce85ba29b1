"""The edit-layer generator: a U-Net (Text2LIVE supplementary A.1).

num_scales encoder levels, each halving the resolution with two 3x3 conv + BN + LeakyReLU
(skip_n33d channels); a symmetric decoder (skip_n33u channels) that upsamples, concatenates
a 1x1-conv skip branch (skip_n11 channels) taken from the matching encoder input, and
refines with a 3x3 and a 1x1 conv; a final 1x1 conv + sigmoid gives 4 channels:
edit colour C (3) and opacity alpha (1). Any input size works; the output has the
input's size.

BatchNorm always normalises with the statistics of the batch at hand (no running
averages): training sees one image per step, and rendering the full image afterwards
uses the same kind of statistics the losses were optimised with.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNAct(nn.Module):
    """conv -> BatchNorm -> LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
        self.bn = nn.BatchNorm2d(c_out, track_running_stats=False)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(ConvBNAct(c_in, c_out, 3, stride=2), ConvBNAct(c_out, c_out, 3))

    def forward(self, x):
        return self.body(x)


class UpBlock(nn.Module):
    """Upsample to the skip's size, concatenate the skip, BN, 3x3 conv, 1x1 conv."""

    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in + c_skip, track_running_stats=False)
        self.conv3 = ConvBNAct(c_in + c_skip, c_out, 3)
        self.conv1 = ConvBNAct(c_out, c_out, 1)

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.bn(torch.cat([skip, x], dim=1))
        return self.conv1(self.conv3(x))


class Generator(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 4, num_scales: int = 7,
                 skip_n33d: int = 128, skip_n33u: int = 128, skip_n11: int = 4):
        super().__init__()
        self.num_scales = num_scales
        downs, skips, ups = [], [], []
        c = in_channels
        for _ in range(num_scales):
            skips.append(ConvBNAct(c, skip_n11, 1) if skip_n11 > 0 else None)
            downs.append(DownBlock(c, skip_n33d))
            c = skip_n33d
        for level in reversed(range(num_scales)):
            c_in = skip_n33d if level == num_scales - 1 else skip_n33u
            ups.append(UpBlock(c_in, skip_n11, skip_n33u))
        self.downs = nn.ModuleList(downs)
        self.skips = nn.ModuleList([s if s is not None else nn.Identity() for s in skips])
        self.use_skips = skip_n11 > 0
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(skip_n33u, out_channels, 1)
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        """x: [B, 3, H, W] in [0, 1] -> [B, 4, H, W] in (0, 1): edit colour (3) and alpha (1)."""
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN convs run ~1.5x faster in NHWC
        B, _, H, W = x.shape
        h, w = H, W
        for _ in range(self.num_scales):
            h, w = (h + 1) // 2, (w + 1) // 2
        if B * h * w < 2:
            raise ValueError(f"input {H}x{W} is too small for num_scales={self.num_scales}: "
                             f"use an image with a side longer than {2 ** self.num_scales} px, or fewer scales")
        skips = []
        for down, skip in zip(self.downs, self.skips):
            skips.append(skip(x) if self.use_skips else x[:, :0])  # [B, n11, h_i, w_i]
            x = down(x)  # [B, n33d, h_i/2, w_i/2]
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return torch.sigmoid(self.head(x).float()).contiguous()


def split_edit_layer(output):
    """Generator output [B, 4, H, W] -> (colour [B, 3, H, W], alpha [B, 1, H, W])."""
    return output[:, :3], output[:, 3:4]
