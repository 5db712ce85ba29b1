"""The edit-layer generator: the Deep-Image-Prior "skip" U-Net of Text2LIVE (supplementary A.1).

Architecture (variant="official", what the authors' define_G builds), num_scales levels,
level 0 = full resolution, every conv with bias, every activation LeakyReLU(0.2):

    skip branch, level i:  1x1 conv (skip_n11) + BN + act on the level's input
    down path,   level i:  3x3 conv stride 2 (skip_n33d) + BN + act, 3x3 conv + BN + act
    up path,     level i:  bilinear x2 upsampling of the deeper output (align_corners=False),
                           both inputs cropped to the smaller size (offset (size - min) // 2,
                           so a 1-pixel excess is cut at the bottom / right),
                           concatenation [skip, upsampled], BN, 3x3 conv (skip_n33u) + BN + act,
                           1x1 conv + BN + act -- no BN after that 1x1 conv at level 0
    head:                  1x1 conv to 4 channels, the fixed colour decorrelation of the RGB
                           channels (alpha untouched), sigmoid

Every conv with a kernel larger than 1x1 pads by reflection ((k - 1) // 2 pixels). The
decorrelation maps rgb'_d = sum_c M[d, c] rgb_c with M = decorrelation_matrix(). Output
channels: edit colour C (3) and opacity alpha (1). (With skip_n11 = 0 the official code has no
Concat and so never crops; here the upsampled map is still cut to the level's size.)

variant="legacy" is this repository's earlier network, kept bit-for-bit so its checkpoints
still render as before: zero padding, BN after the 1x1 conv at every level, upsampling by
interpolating straight to the skip's size, no decorrelation.

Any input size works and the output has the input's size. The official net needs every
feature map to be at least 2 px per side (reflection padding, BatchNorm statistics): an
input with a side under 2 ** num_scales + 1 px is padded up to that (reflection when the
image is large enough, else replication) and the output is cropped back. Larger inputs take
the plain path, untouched. The legacy net pads only inputs its old code refused.

BatchNorm always normalises with the statistics of the batch at hand (no running
averages): training sees one image per step, and rendering the full image afterwards
uses the same kind of statistics the losses were optimised with.

State dict keys (n = num_scales; ups[j] is level n - 1 - j, so ups[0] is the deepest and
ups[n - 1] the full-resolution level; {conv}.weight/bias, {bn}.weight/bias):

    skips.{i}.conv, skips.{i}.bn                  1x1 skip branch (absent when skip_n11 = 0)
    downs.{i}.body.0.conv, downs.{i}.body.0.bn    3x3 stride-2 conv
    downs.{i}.body.1.conv, downs.{i}.body.1.bn    3x3 conv
    ups.{j}.bn                                    BN over [skip, upsampled]
    ups.{j}.conv3.conv, ups.{j}.conv3.bn          3x3 conv
    ups.{j}.conv1.conv, ups.{j}.conv1.bn          1x1 conv (official: no ups.{n-1}.conv1.bn)
    head                                          final 1x1 conv

The decorrelation matrix is the buffer decorrelate.matrix; it is a constant of the
architecture, not saved in the state dict. Checkpoints store generator_config(cfg) next to
the state dict; generator_from_checkpoint rebuilds the right variant from the two.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("official", "legacy")
ARCH_KEYS = ("num_scales", "skip_n33d", "skip_n33u", "skip_n11")


def decorrelation_matrix() -> torch.Tensor:
    """The fixed [3, 3] map from the decorrelated colour space to RGB: rgb = M @ colour."""
    m = torch.tensor([[0.26, 0.09, 0.02],
                      [0.27, 0.00, -0.05],
                      [0.27, -0.09, 0.03]])
    m[:, 0] /= 1.6  # saturate the first (luminance-like) component
    return m / m.norm(dim=0).max()  # largest column L2 norm -> 1


class DecorrelatedColoursToRGB(nn.Module):
    """[B, C >= 3, H, W]: channels 0..2 -> M @ rgb, the others (alpha) unchanged."""

    def __init__(self):
        super().__init__()
        self.register_buffer("matrix", decorrelation_matrix(), persistent=False)

    def forward(self, x):
        # broadcast multiply + sum rather than matmul/conv: stays in x's precision under autocast
        m = self.matrix.to(x.dtype).view(1, 3, 3, 1, 1)
        rgb = (m * x[:, None, :3]).sum(2)  # [B, 3, H, W]
        return torch.cat([rgb, x[:, 3:]], dim=1)


class ConvBNAct(nn.Module):
    """conv (zero or reflection padding) -> BatchNorm (or none) -> LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1,
                 reflect: bool = False, norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2,
                              padding_mode="reflect" if reflect else "zeros")
        self.bn = nn.BatchNorm2d(c_out, track_running_stats=False) if norm else nn.Identity()
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, reflect: bool):
        super().__init__()
        self.body = nn.Sequential(ConvBNAct(c_in, c_out, 3, stride=2, reflect=reflect),
                                  ConvBNAct(c_out, c_out, 3, reflect=reflect))

    def forward(self, x):
        return self.body(x)


def crop_to_common_size(*tensors):
    """Crop [B, C, H, W] tensors to the smallest H and W among them, each from offset
    (size - smallest) // 2, as the official skip net's Concat does."""
    h = min(t.shape[-2] for t in tensors)
    w = min(t.shape[-1] for t in tensors)
    out = []
    for t in tensors:
        top, left = (t.shape[-2] - h) // 2, (t.shape[-1] - w) // 2
        out.append(t[..., top:top + h, left:left + w])
    return out


class UpBlock(nn.Module):
    """Upsample, concatenate the skip, BN, 3x3 conv, 1x1 conv (see the module docstring)."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, official: bool, top: bool):
        super().__init__()
        self.official = official
        self.bn = nn.BatchNorm2d(c_in + c_skip, track_running_stats=False)
        self.conv3 = ConvBNAct(c_in + c_skip, c_out, 3, reflect=official)
        self.conv1 = ConvBNAct(c_out, c_out, 1, norm=not (official and top))

    def forward(self, x, skip):
        if self.official:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # [B, C, 2h, 2w]
            skip, x = crop_to_common_size(skip, x)
        else:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.bn(torch.cat([skip, x], dim=1))  # [B, n11 + C, h_skip, w_skip]
        return self.conv1(self.conv3(x))


def pad_side(x, dim: int, size: int):
    """Pad dimension dim (-2 or -1) of x [B, C, H, W] up to size, half before and half after:
    by reflection when x is large enough for it, else by replication.
    Returns (padded x, offset of the original inside it)."""
    n = x.shape[dim]
    if n >= size:
        return x, 0
    before = (size - n) // 2
    after = size - n - before
    pad = (before, after, 0, 0) if dim == -1 else (0, 0, before, after)
    return F.pad(x, pad, mode="reflect" if after < n else "replicate"), before


class Generator(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 4, num_scales: int = 7,
                 skip_n33d: int = 128, skip_n33u: int = 128, skip_n11: int = 4,
                 variant: str = "official"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"generator variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}")
        official = variant == "official"
        if official and out_channels < 3:
            raise ValueError(f"the official generator decorrelates 3 colour channels; out_channels={out_channels}")
        self.variant = variant
        self.num_scales = num_scales
        # what a checkpoint stores beside the weights (generator_from_checkpoint reads it back)
        self.config = dict(num_scales=num_scales, skip_n33d=skip_n33d, skip_n33u=skip_n33u,
                           skip_n11=skip_n11, variant=variant)
        downs, skips, ups = [], [], []
        c = in_channels
        for _ in range(num_scales):
            skips.append(ConvBNAct(c, skip_n11, 1) if skip_n11 > 0 else nn.Identity())
            downs.append(DownBlock(c, skip_n33d, reflect=official))
            c = skip_n33d
        for level in reversed(range(num_scales)):
            c_in = skip_n33d if level == num_scales - 1 else skip_n33u
            ups.append(UpBlock(c_in, skip_n11, skip_n33u, official=official, top=level == 0))
        self.downs = nn.ModuleList(downs)
        self.skips = nn.ModuleList(skips)
        self.use_skips = skip_n11 > 0
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(skip_n33u, out_channels, 1)
        self.decorrelate = DecorrelatedColoursToRGB() if official else nn.Identity()
        self.to(memory_format=torch.channels_last)

    def min_side(self) -> int:
        """Smallest input side the network runs on unpadded: 2 px per side at the deepest level."""
        return 2 ** self.num_scales + 1

    def needs_padding(self, shape) -> bool:
        B, _, H, W = shape
        if self.variant == "official":
            return min(H, W) < self.min_side()
        h, w = H, W  # legacy: the old code ran whenever the deepest BN saw > 1 value
        for _ in range(self.num_scales):
            h, w = (h + 1) // 2, (w + 1) // 2
        return B * h * w < 2

    def forward(self, x):
        """x: [B, 3, H, W] in [0, 1] -> [B, 4, H, W] in (0, 1): edit colour (3) and alpha (1)."""
        H, W = x.shape[-2:]
        padded = self.needs_padding(x.shape)
        if padded:
            x, top = pad_side(x, -2, self.min_side())
            x, left = pad_side(x, -1, self.min_side())  # [B, 3, >= min_side, >= min_side]
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN convs are faster in NHWC (README: Time and memory)
        skips = []
        for down, skip in zip(self.downs, self.skips):
            skips.append(skip(x) if self.use_skips else x[:, :0])  # [B, n11, h_i, w_i]
            x = down(x)  # [B, n33d, h_i/2, w_i/2]
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)  # [B, n33u, h_i, w_i]
        out = torch.sigmoid(self.decorrelate(self.head(x).float()))  # [B, 4, H_run, W_run]
        if padded:
            out = out[..., top:top + H, left:left + W]
        return out.contiguous()


def generator_config(cfg: dict) -> dict:
    """What a new checkpoint stores next to the generator's state dict."""
    return {**{k: cfg[k] for k in ARCH_KEYS}, "variant": "official"}


def _fit_problem(generator: Generator, state_dict: dict) -> str:
    """'' when state_dict's keys and shapes are the generator's, else what differs."""
    expected = generator.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and hasattr(state_dict[k], "shape")
                   and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrongly shaped weights", wrong_shape))
                if keys]
    return ", ".join(problems)


def generator_from_checkpoint(generator_config: dict, state_dict: dict) -> Generator:
    """Rebuild a checkpoint's generator: the variant named in generator_config (files without
    one are legacy), its weights loaded. ValueError, in one line, when they do not fit."""
    variant = generator_config.get("variant", "legacy")
    arch = {k: v for k, v in generator_config.items() if k != "variant"}
    try:
        generator = Generator(**arch, variant=variant)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint generator_config {generator_config} does not describe a generator "
                         f"({e}); re-train with train_image.py") from None
    problem = _fit_problem(generator, state_dict)
    if problem:
        other = Generator(**arch, variant="official" if variant == "legacy" else "legacy")
        hint = ""
        if not _fit_problem(other, state_dict):
            hint = f" (they fit the {other.variant} variant: is generator_config's 'variant' wrong?)"
        raise ValueError(f"checkpoint weights do not fit the {variant} generator {arch}: {problem}{hint}; "
                         f"the checkpoint comes from another architecture: re-train with train_image.py")
    try:
        generator.load_state_dict(state_dict)
    except Exception as e:
        message = str(e).replace("\n", " ").replace("\t", "")
        raise ValueError(f"checkpoint weights do not load into the {variant} generator {arch}: {message}; "
                         f"re-train with train_image.py") from None
    return generator


def split_edit_layer(output):
    """Generator output [B, 4, H, W] -> (colour [B, 3, H, W], alpha [B, 1, H, W])."""
    return output[:, :3], output[:, 3:4]
