import pytest
import torch

from datasets.atlas import AtlasBox, bounding_box, discretize_atlas, frame_maps, sample_atlas
from models.nla import MLP, NLAModel


def test_box_size_and_pixel_centres():
    box = AtlasBox(0.0, 0.0, 0.5, 0.25, resolution=8)
    assert box.size == (2, 4)
    centres = box.pixel_centres()
    assert torch.allclose(centres[0], torch.tensor([1 / 16, 1 / 16]))
    assert torch.allclose(centres[-1], torch.tensor([0.5 - 1 / 16, 0.25 - 1 / 16]))


@pytest.mark.parametrize("align_corners", [False, True])
def test_sampling_at_pixel_centres_returns_the_pixels(align_corners):
    box = AtlasBox(-0.5, -1.0, 0.0, -0.5, resolution=16)
    h, w = box.size
    image = torch.rand(1, 3, h, w)
    uv = box.pixel_centres().view(1, h, w, 2)
    assert torch.allclose(sample_atlas(image, box, uv, align_corners), image, atol=1e-5)


def test_bounding_box_respects_mask_and_rejects_empty():
    uv = torch.tensor([[0.1, 0.2], [0.4, 0.9], [0.95, 0.95]])
    box = bounding_box(uv, torch.tensor([True, True, False]), resolution=100, margin_px=0)
    assert (box.u0, box.v0, box.u1, box.v1) == pytest.approx((0.1, 0.2, 0.4, 0.9))
    with pytest.raises(ValueError, match="no pixel maps"):
        bounding_box(uv, torch.zeros(3, dtype=torch.bool))


def test_discretised_atlas_sampled_back_reconstructs_the_frames():
    torch.manual_seed(0)
    # a smooth atlas (4 encoding frequencies) so that a 400 px/UV grid resolves it
    nets = {"mapping_foreground": MLP(3, 2, 4, 64), "mapping_background": MLP(3, 2, 4, 64),
            "atlas": MLP(2, 3, 4, 64, 4, (2,)), "alpha": MLP(3, 1, 4, 64, 3)}
    nla = NLAModel(24, 16, 4, nets)
    maps = frame_maps(nla, progress=False)
    assert maps["uv_fg"].shape == (4, 16, 24, 2) and maps["alpha"].shape == (4, 16, 24, 1)
    T = 4
    recon = []
    for layer in ("fg", "bg"):
        uv = maps[f"uv_{layer}"]
        box = bounding_box(uv.reshape(-1, 2), resolution=400)
        atlas = discretize_atlas(nla, box, progress=False)
        recon.append(sample_atlas(atlas.expand(T, -1, -1, -1), box, uv))  # [T, 3, H, W]
    alpha = maps["alpha"].permute(0, 3, 1, 2)
    frames = alpha * recon[0] + (1 - alpha) * recon[1]
    reference = torch.stack([nla.render_frame(t)["rgb"] for t in range(T)]).permute(0, 3, 1, 2)
    assert (frames - reference).abs().max() < 0.02
