"""Which pixels an atlas training step learns from (PixelSampler).

NLA draws every step's samples_batch pixels uniformly over the video. A moving object usually
covers a small part of the frame and holds most of the error (non-rigid parts, turning
surfaces), so uniform samples spend most of the model's updates where it is already good.
PixelSampler can give shares of each step's pixels to

    the object      blocks of BLOCK x BLOCK pixels that touch the object's mask (so its edges,
                    where the rough mask and the true outline disagree, are drawn too)
    the error       blocks drawn in proportion to their reconstruction error, measured on a
                    sparse lattice of pixels every REFRESH_EVERY steps (refresh)

and draws the rest uniformly. With both shares 0 it draws exactly what sample_pixels draws
(the official sampling, the same random numbers). With sample_object_while_worse (the
default), the object's share is drawn only while the object reconstructs worse than the
background (a larger mean squared error at the last measurement); while it is as good, those
pixels are drawn uniformly, so an easy object (blackswan's swan) does not take samples the
background needs.
"""

import math

import torch

from datasets.video_data import VideoData, sample_pixels

BLOCK = 8  # pixels per side of the blocks the object and error shares are drawn by
LATTICE = 4  # refresh() measures the error at every LATTICE-th pixel along x and y (16x fewer than all),
MAX_MEASURED = 2 ** 19  # or sparser, so that one refresh renders at most this many pixels (a long video)
REFRESH_EVERY = 250  # steps between two measurements of the error (about 3% of the training time)
GRID_SHARES = (0.3, 0.3)  # (object, error) shares for the grid backend when the keys are null (README)


def sample_shares(cfg: dict, has_masks: bool) -> tuple[float, float]:
    """(object share, error share) of each step's pixels. null keys take the backend's default:
    the official uniform sampling for atlas_backend=mlp, GRID_SHARES for grid. Without masks
    the object share goes to the uniform draw."""
    defaults = GRID_SHARES if cfg["atlas_backend"] == "grid" else (0.0, 0.0)
    share_object = cfg.get("sample_object_share")
    share_error = cfg.get("sample_error_share")
    share_object = defaults[0] if share_object is None else share_object
    share_error = defaults[1] if share_error is None else share_error
    return (share_object if has_masks else 0.0), share_error


class PixelSampler:
    """sampler(n) -> (t, y, x, g) as sample_pixels returns: integer pixel coordinates with room
    for the right and lower neighbours, and each sample's flow-gap index.

    sampler.refresh(nla) measures the error the error share follows; call it when
    sampler.due(step) says so (at the first step and every REFRESH_EVERY steps, with an error
    share). Until then the error share is drawn uniformly over the blocks."""

    def __init__(self, data: VideoData, cfg: dict, rng: torch.Generator):
        self.data, self.rng = data, rng
        self.share_object, self.share_error = sample_shares(cfg, data.masks is not None)
        object_while_worse = bool(cfg.get("sample_object_while_worse", False))
        self.object_worse = True  # until measured, the object's share is drawn
        self.measured = False
        device = rng.device
        self.blocks_y, self.blocks_x = -(-(data.H - 1) // BLOCK), -(-(data.W - 1) // BLOCK)  # over the samplable area
        self.object_cdf = None
        if self.share_object > 0:
            on_object = (data.masks[:, :data.H - 1, :data.W - 1] >= 0.5).float()[:, None]  # [T, 1, H-1, W-1]
            touched = torch.nn.functional.max_pool2d(on_object, BLOCK, ceil_mode=True)[:, 0]  # [T, By, Bx]
            if touched.sum() > 0:
                self.object_cdf = self.cdf(touched.to(device))
            else:  # no object anywhere: its share is drawn uniformly
                self.share_object = 0.0
        self.compares_object = object_while_worse and self.object_cdf is not None  # measures object_worse
        self.error_cdf = None
        if self.share_error > 0:
            self.block_error = torch.ones(data.T * self.blocks_y * self.blocks_x, device=device)  # [blocks]
            self.error_cdf = self.cdf(self.block_error)

    @staticmethod
    def cdf(weights):
        """Cumulative weights of the blocks, flattened (float64: a million blocks add up exactly)."""
        return weights.flatten().double().cumsum(0)

    def measures(self) -> bool:
        """Whether training measures the error: for the error share, or to know whether the
        object still reconstructs worse than the background."""
        return self.share_error > 0 or self.compares_object

    def due(self, step: int) -> bool:
        return self.measures() and (not self.measured or step % REFRESH_EVERY == 0)

    @torch.no_grad()
    def refresh(self, nla, chunk: int = 65536):
        """Measure the reconstruction's squared error on a lattice of pixels (every LATTICE-th
        along x and y, sparser on a long video so that at most MAX_MEASURED are rendered; offset
        by a random phase, so every pixel is measured now and then) and make each measured
        block's weight its mean error there (a block the lattice missed keeps its last weight),
        plus a floor of 1% of the mean weight, so no block is starved. With
        sample_object_while_worse, it also compares the mean error on the object's mask and
        off it (object_worse)."""
        data, device = self.data, self.rng.device
        stride = max(LATTICE, math.ceil(math.sqrt(data.T * (data.H - 1) * (data.W - 1) / MAX_MEASURED)))
        phase = torch.randint(0, stride, (2,), generator=self.rng, device=device)
        ys = torch.arange(0, data.H - 1, stride, device=device) + phase[0]
        xs = torch.arange(0, data.W - 1, stride, device=device) + phase[1]
        ys, xs = ys[ys < data.H - 1], xs[xs < data.W - 1]
        grid_t, grid_y, grid_x = torch.meshgrid(torch.arange(data.T, device=device), ys, xs, indexing="ij")
        t, y, x = grid_t.flatten(), grid_y.flatten(), grid_x.flatten()  # [M] each
        error = torch.empty(t.shape[0], device=device)
        model_device = next(nla.parameters()).device
        for i in range(0, t.shape[0], chunk):
            tc, yc, xc = t[i:i + chunk], y[i:i + chunk], x[i:i + chunk]
            rgb = nla(nla.normalize(xc.float(), yc.float(), tc.float()).to(model_device))["rgb"].to(device)
            error[i:i + chunk] = ((rgb - data.frames[tc, yc, xc].to(device)) ** 2).sum(-1)
        if self.compares_object:
            on_object = data.masks[t, y, x].to(device) >= 0.5  # [M]
            if on_object.any() and not on_object.all():  # else keep the last answer
                self.object_worse = bool(error[on_object].mean() > error[~on_object].mean())
        if self.error_cdf is not None:
            block = (t * self.blocks_y + y // BLOCK) * self.blocks_x + x // BLOCK
            total = torch.zeros(data.T * self.blocks_y * self.blocks_x, device=device).index_add_(0, block, error)
            count = torch.zeros_like(total).index_add_(0, block, torch.ones_like(error))
            self.block_error = torch.where(count > 0, total / count.clamp(min=1), self.block_error)
            self.error_cdf = self.cdf(self.block_error + 0.01 * self.block_error.mean().clamp(min=1e-8))
        self.measured = True

    def from_blocks(self, n: int, cdf):
        """n pixels: a block drawn with probability proportional to its weight, then a uniform
        pixel inside it (within the samplable area)."""
        device, data = self.rng.device, self.data
        u = torch.rand(n, generator=self.rng, device=device, dtype=torch.float64) * cdf[-1]
        block = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[0] - 1)
        per_frame = self.blocks_y * self.blocks_x
        t, by, bx = block // per_frame, block % per_frame // self.blocks_x, block % self.blocks_x
        y0, x0 = by * BLOCK, bx * BLOCK
        span_y = (data.H - 1 - y0).clamp(max=BLOCK)  # the last row and column of blocks may be cut
        span_x = (data.W - 1 - x0).clamp(max=BLOCK)
        y = y0 + (torch.rand(n, generator=self.rng, device=device) * span_y).long().minimum(span_y - 1)
        x = x0 + (torch.rand(n, generator=self.rng, device=device) * span_x).long().minimum(span_x - 1)
        return t, y, x

    def __call__(self, n: int):
        n_object = round(n * self.share_object) if self.object_cdf is not None and self.object_worse else 0
        n_error = round(n * self.share_error) if self.error_cdf is not None else 0
        if n_object == 0 and n_error == 0:
            return sample_pixels(n, self.data, self.rng)
        t, y, x, g = sample_pixels(n - n_object - n_error, self.data, self.rng)
        parts = [(t, y, x)]
        if n_object:
            parts.append(self.from_blocks(n_object, self.object_cdf))
        if n_error:
            parts.append(self.from_blocks(n_error, self.error_cdf))
        t, y, x = (torch.cat(column) for column in zip(*parts))
        g = torch.randint(0, len(self.data.gaps), (n,), generator=self.rng, device=self.rng.device)
        return t, y, x, g
