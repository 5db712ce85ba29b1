"""NLA networks in the official checkpoint format, built and checked here (no downloads)."""

import math

import pytest
import torch

from models.nla import CHECKPOINT_KEYS, MLP, CheckpointError, NLAModel, positional_encoding


def test_positional_encoding_order_and_length():
    x = torch.tensor([[0.25, -0.5]])
    enc = positional_encoding(x, 3)
    assert enc.shape == (1, 2 * 2 * 3)
    for k in range(3):
        b = 2 ** k * math.pi
        expected = [math.sin(b * 0.25), math.sin(b * -0.5), math.cos(b * 0.25), math.cos(b * -0.5)]
        assert torch.allclose(enc[0, 4 * k:4 * k + 4], torch.tensor(expected), atol=1e-6)
    assert torch.equal(positional_encoding(x, 0), x)


def test_default_architectures_match_the_official_shapes():
    sd = NLAModel(64, 48, 10).checkpoint()
    assert set(sd) == set(CHECKPOINT_KEYS.values())
    atlas = sd["F_atlas_state_dict"]
    assert atlas["hidden.0.weight"].shape == (256, 40)
    assert atlas["hidden.4.weight"].shape == (256, 256 + 40) and atlas["hidden.7.weight"].shape == (3, 256 + 40)
    assert sd["model_F_alpha_state_dict"]["hidden.0.weight"].shape == (256, 30)
    assert len({k.split(".")[1] for k in sd["model_F_mapping1_state_dict"]}) == 6
    assert len({k.split(".")[1] for k in sd["model_F_mapping2_state_dict"]}) == 4


def test_checkpoint_round_trip_reproduces_the_networks(tmp_path):
    torch.manual_seed(0)
    model = NLAModel(64, 48, 10)
    path = tmp_path / "checkpoint"
    torch.save({**model.checkpoint(), "iteration": 5, "optimizer_state_dict": {}}, path)
    loaded = NLAModel.from_checkpoint(path, 64, 48, 10)
    for name in ("mapping_foreground", "mapping_background", "atlas", "alpha"):
        assert getattr(loaded, name).architecture() == getattr(model, name).architecture()
    p = torch.rand(100, 3) * 2 - 1
    a, b = model(p), loaded(p)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_layers_uv_ranges_and_blending():
    model = NLAModel(32, 24, 6)
    maps = model.render_frame(2, chunk=100)
    assert maps["rgb"].shape == (24, 32, 3) and maps["uv_fg"].shape == (24, 32, 2)
    assert maps["uv_fg"].min() >= 0 and maps["uv_fg"].max() <= 1
    assert maps["uv_bg"].min() >= -1 and maps["uv_bg"].max() <= 0
    assert maps["alpha"].min() >= 0.001 and maps["alpha"].max() <= 0.991
    blend = maps["alpha"] * maps["fg"] + (1 - maps["alpha"]) * maps["bg"]
    assert torch.allclose(maps["rgb"], blend)
    # coordinates: pixel (x, y) of frame t -> (x/(L/2) - 1, y/(L/2) - 1, t/(T/2) - 1)
    p = model.frame_coords(3)
    assert torch.allclose(p[0], torch.tensor([-1.0, -1.0, 0.0]))
    assert torch.allclose(p[-1], torch.tensor([31 / 16 - 1, 23 / 16 - 1, 0.0]))


def test_custom_shapes_are_read_off_the_file(tmp_path):
    nets = {"mapping_foreground": MLP(3, 2, 3, 32), "mapping_background": MLP(3, 2, 3, 32),
            "atlas": MLP(2, 3, 4, 32, 4, (2,)), "alpha": MLP(3, 1, 3, 16, 2)}
    model = NLAModel(16, 16, 4, nets)
    torch.save(model.checkpoint(), tmp_path / "c")
    loaded = NLAModel.from_checkpoint(tmp_path / "c", 16, 16, 4)
    assert loaded.atlas.architecture() == (2, 3, 4, 32, 4, (2,))
    assert loaded.alpha.architecture() == (3, 1, 3, 16, 2, ())


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        NLAModel.from_checkpoint(tmp_path / "none", 8, 8, 2)
    junk = tmp_path / "junk"
    junk.write_text("junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        NLAModel.from_checkpoint(junk, 8, 8, 2)
    sd = NLAModel(8, 8, 2).checkpoint()
    partial = dict(sd)
    del partial["model_F_alpha_state_dict"]
    torch.save(partial, tmp_path / "partial")
    with pytest.raises(CheckpointError, match="lacks model_F_alpha_state_dict"):
        NLAModel.from_checkpoint(tmp_path / "partial", 8, 8, 2)
    wrong = dict(sd)
    wrong["F_atlas_state_dict"] = dict(sd["F_atlas_state_dict"])
    wrong["F_atlas_state_dict"]["hidden.3.weight"] = torch.zeros(256, 100)
    torch.save(wrong, tmp_path / "wrong")
    with pytest.raises(CheckpointError, match="unexpected tensor shapes"):
        NLAModel.from_checkpoint(tmp_path / "wrong", 8, 8, 2)


def test_grid_atlas_interpolates_and_only_nearby_texels_learn():
    from models.nla import GridAtlas
    torch.manual_seed(0)
    atlas = GridAtlas(3, levels=3, features=2, base_resolution=4, max_resolution=32, width=8)
    with torch.no_grad():
        for g in atlas.grids:
            g.normal_()
    uv = torch.rand(64, 2) * 1.6 - 0.8
    out = atlas(uv)
    assert out.shape == (64, 3) and out.abs().max() <= 1
    assert (atlas(uv + 1e-5) - out).abs().max() < 1e-2  # continuous
    atlas(torch.tensor([[0.5, 0.5]])).sum().backward()
    finest = atlas.grids[-1].grad[0, 0]  # [32, 32]
    assert 0 < int((finest != 0).sum()) <= 4  # the four texels around one sample


def test_coarse_mapping_levels_add_smooth_offsets_and_learn():
    from models.nla import GridMapping
    mapping = GridMapping(64, 32, 4, cell=4, scale=0.8, levels=3)
    assert [tuple(g.shape[-2:]) for g in [mapping.offsets, *mapping.coarse]] == [(9, 17), (5, 9), (3, 5)]
    model = NLAModel(64, 32, 4)
    p = model.normalize(torch.rand(200) * 63, torch.rand(200) * 31, torch.randint(0, 4, (200,)).float())
    assert torch.allclose(mapping(p), 0.8 * p[:, :2], atol=1e-6)  # identity at the start
    with torch.no_grad():
        mapping.coarse[1][:, 0] = 0.05  # the coarsest level shifts everything right
    assert torch.allclose(mapping(p)[:, 0], 0.8 * p[:, 0] + 0.05, atol=1e-6)
    loss = (mapping(p) - 0.8 * p[:, :2]).pow(2).sum()
    loss.backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in [mapping.offsets, *mapping.coarse])


@pytest.mark.parametrize("resx, resy, cell, levels", [(64, 32, 4, 3), (100, 37, 7, 2), (48, 48, 5, 4)])
def test_mapping_equals_each_level_sampled_and_summed_and_past_the_frame_the_border(resx, resy, cell, levels):
    """GridMapping gathers each level's vertices around a point; that must equal grid_sample of
    each level on its own, summed, inside the frame, and past it (the global rigidity looks 100 px
    away) what the earlier implementation gave, which trained the atlases made before: every level
    upsampled to the finest vertices, summed, and sampled once with border padding."""
    import torch.nn.functional as F

    from models.nla import GridMapping
    torch.manual_seed(0)
    T = 3
    mapping = GridMapping(resx, resy, T, cell=cell, scale=0.8, levels=levels)
    with torch.no_grad():
        for grid in mapping.parameters():
            grid.normal_()
    x, y, t = torch.rand(500) * (resx - 1), torch.rand(500) * (resy - 1), torch.randint(0, T, (500,)).float()
    p = NLAModel(resx, resy, T).normalize(x, y, t)
    depth = t / (T - 1) * 2 - 1
    expected = 0.8 * p[:, :2]
    for grid, c in zip([mapping.offsets, *mapping.coarse], mapping.cells):
        h, w = grid.shape[-2:]
        at = torch.stack([x / ((w - 1) * c) * 2 - 1, y / ((h - 1) * c) * 2 - 1, depth], dim=-1).view(1, -1, 1, 1, 3)
        expected = expected + F.grid_sample(grid, at, align_corners=True, padding_mode="border")[0, :, :, 0, 0].t()
    assert torch.allclose(mapping(p), expected, atol=2e-5)

    far_x, far_y = x + torch.randint(-100, 101, (500,)), y + torch.randint(-100, 101, (500,))  # in and out
    summed = mapping.offsets
    grid_h, grid_w = summed.shape[-2:]
    for level, coarse in enumerate(mapping.coarse, start=1):
        f, (h, w) = 2 ** level, coarse.shape[-2:]
        up = F.interpolate(coarse.flatten(1, 2), size=(f * (h - 1) + 1, f * (w - 1) + 1), mode="bilinear",
                           align_corners=True)
        summed = summed + up[..., :grid_h, :grid_w].view_as(summed)
    at = torch.stack([far_x / ((grid_w - 1) * cell) * 2 - 1, far_y / ((grid_h - 1) * cell) * 2 - 1, depth], dim=-1)
    before = F.grid_sample(summed, at.view(1, -1, 1, 1, 3), align_corners=True, padding_mode="border")
    far = NLAModel(resx, resy, T).normalize(far_x, far_y, t)
    assert torch.allclose(mapping(far), 0.8 * far[:, :2] + before[0, :, :, 0, 0].t(), atol=2e-5)


def test_a_mapping_step_changes_only_the_vertices_around_its_points():
    """A point's gradient reaches the 4 vertices of its cell in its own frame, on every level, and
    no other frame (what keeps a step's cost flat in the clip's length)."""
    from models.nla import GridMapping
    mapping = GridMapping(64, 32, 5, cell=4, scale=0.8, levels=3)
    p = NLAModel(64, 32, 5).normalize(torch.tensor([10.5]), torch.tensor([6.25]), torch.tensor([3.0]))
    mapping(p).sum().backward()
    for grid, cell in zip([mapping.offsets, *mapping.coarse], mapping.cells):
        touched = grid.grad[0, 0].nonzero().tolist()  # [frame, row, column] of every vertex with a gradient
        x0, y0 = int(10.5 // cell), int(6.25 // cell)
        assert sorted(touched) == [[3, y0 + dy, x0 + dx] for dy in (0, 1) for dx in (0, 1)]
        assert torch.isclose(grid.grad[0, 0].sum(), torch.tensor(1.0))  # bilinear weights sum to 1


def test_grid_mapping_starts_as_the_scaled_identity_and_keeps_rigidity_zero():
    from losses.nla import rigidity_loss
    from models.nla import GridMapping
    mapping = GridMapping(40, 24, 5, cell=8, scale=0.8)
    model = NLAModel(40, 24, 5)
    x, y, t = torch.rand(100) * 39, torch.rand(100) * 23, torch.randint(0, 5, (100,)).float()
    p = model.normalize(x, y, t)
    assert torch.allclose(mapping(p), 0.8 * p[:, :2], atol=1e-6)
    # past the frame too (the global rigidity term looks 100 px away)
    far = model.normalize(x + 100, y, t)
    step = 100 / 20
    assert rigidity_loss(mapping(p), mapping(far), mapping(model.normalize(x, y + 100, t)), step, 0.8) < 1e-4
    with torch.no_grad():
        mapping.offsets[:, :, 2] = 0.1  # frame 2 moves by 0.1 in both directions
    moved = mapping(model.normalize(x, y, torch.full_like(t, 2.0)))
    assert torch.allclose(moved, 0.8 * model.normalize(x, y, torch.full_like(t, 2.0))[:, :2] + 0.1, atol=1e-6)


def test_grid_checkpoint_round_trip(tmp_path):
    from models.nla import MLP, GridAtlas, GridMapping
    torch.manual_seed(0)
    nets = {"mapping_foreground": GridMapping(16, 12, 3, cell=4), "mapping_background": GridMapping(16, 12, 3, cell=4),
            "atlas": GridAtlas(3, levels=3, base_resolution=4, max_resolution=16, width=8),
            "alpha": MLP(3, 1, 3, 16, 2)}
    with torch.no_grad():
        for name in ("mapping_foreground", "mapping_background", "atlas"):
            for param in nets[name].parameters():
                param.normal_(std=0.05)
    model = NLAModel(16, 12, 3, nets)
    state = model.checkpoint()
    assert state["atlas_backend"] == "grid"
    torch.save(state, tmp_path / "checkpoint")
    loaded = NLAModel.from_checkpoint(tmp_path / "checkpoint", 16, 12, 3)
    p = torch.rand(50, 3) * 2 - 1
    a, b = model(p), loaded(p)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state["F_atlas_state_dict"]["grids.0"] = torch.zeros(1, 2, 5, 5)
    torch.save(state, tmp_path / "broken")
    with pytest.raises(CheckpointError, match="does not match its stored architecture"):
        NLAModel.from_checkpoint(tmp_path / "broken", 16, 12, 3)


def test_mixed_precision_keeps_mappings_in_float32_and_gradients_flowing():
    torch.manual_seed(0)
    model = NLAModel(16, 12, 3, {"mapping_foreground": MLP(3, 2, 3, 16), "mapping_background": MLP(3, 2, 3, 16),
                                 "atlas": MLP(2, 3, 3, 16, 4), "alpha": MLP(3, 1, 3, 16, 2)})
    model.amp_dtype = torch.bfloat16
    out = model(torch.rand(40, 3) * 2 - 1)
    assert all(v.dtype == torch.float32 for v in out.values())  # bf16 inside, float32 outside
    # the mappings never see bf16: identical to a float32 model's
    p = torch.rand(40, 3) * 2 - 1
    model.amp_dtype = None
    reference = model.uv_foreground(p)
    model.amp_dtype = torch.bfloat16
    assert torch.equal(model.uv_foreground(p), reference)
    out["rgb"].sum().backward()
    assert model.atlas.hidden[0].weight.grad.abs().sum() > 0 and model.alpha.hidden[0].weight.grad.abs().sum() > 0


def test_auto_precision_is_bf16_where_fast_and_float32_for_the_official_mlps_on_a_cpu(monkeypatch):
    from training import nla as nla_training
    from util.config import load_config
    cfg = load_config("nla")
    monkeypatch.setattr(nla_training, "resolve_precision", lambda mode, device: torch.bfloat16)  # a bf16 CPU
    assert nla_training.nla_precision(cfg, "cpu") == torch.bfloat16  # the grid backend
    assert nla_training.nla_precision({**cfg, "atlas_backend": "mlp"}, "cpu") is None
    assert nla_training.nla_precision({**cfg, "atlas_backend": "mlp", "mixed_precision": "bf16"}, "cpu") == torch.bfloat16
