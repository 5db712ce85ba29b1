import math

import pytest
import torch
import torch.nn.functional as F

from models.generator import (
    Generator,
    UpBlock,
    crop_to_common_size,
    generator_config,
    generator_from_checkpoint,
    split_edit_layer,
)

SMALL = dict(num_scales=3, skip_n33d=8, skip_n33u=6, skip_n11=2)


def hand_decorrelation_matrix():
    """M from the numbers in the Text2LIVE code, in plain Python: first column / 1.6, then the
    whole matrix / its largest column L2 norm."""
    m = [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]]
    m = [[row[0] / 1.6, row[1], row[2]] for row in m]
    largest = max(math.sqrt(sum(row[c] ** 2 for row in m)) for c in range(3))
    return torch.tensor([[v / largest for v in row] for row in m], dtype=torch.float64)


# ---- an independent, functional re-implementation of both variants from the state dict ----

def batch_norm(x, sd, prefix):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    w, b = sd[prefix + ".weight"].view(1, -1, 1, 1), sd[prefix + ".bias"].view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def conv_bn_act(x, sd, prefix, stride=1, reflect=False, norm=True):
    w, b = sd[prefix + ".conv.weight"], sd[prefix + ".conv.bias"]
    p = (w.shape[-1] - 1) // 2
    if reflect:
        x = F.pad(x, (p, p, p, p), mode="reflect") if p else x
        x = F.conv2d(x, w, b, stride=stride)
    else:
        x = F.conv2d(x, w, b, stride=stride, padding=p)
    if norm:
        x = batch_norm(x, sd, prefix + ".bn")
    return F.leaky_relu(x, 0.2)


def reference_generator(sd, x, num_scales, official):
    """Legacy: zero padding, interpolate to the skip's size, BN after every 1x1, plain sigmoid.
    Official: reflection padding, x2 upsampling cut to the skip's size (excess is 0 or 1 px, cut
    at the bottom/right), no BN after the full-resolution 1x1, decorrelated RGB, sigmoid."""
    skips = []
    for i in range(num_scales):
        skips.append(conv_bn_act(x, sd, f"skips.{i}"))
        x = conv_bn_act(x, sd, f"downs.{i}.body.0", stride=2, reflect=official)
        x = conv_bn_act(x, sd, f"downs.{i}.body.1", reflect=official)
    for j in range(num_scales):
        skip = skips[num_scales - 1 - j]
        h, w = skip.shape[-2:]
        if official:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            assert x.shape[-2] - h in (0, 1) and x.shape[-1] - w in (0, 1)
            x = x[..., :h, :w]
        else:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        x = batch_norm(torch.cat([skip, x], dim=1), sd, f"ups.{j}.bn")
        x = conv_bn_act(x, sd, f"ups.{j}.conv3", reflect=official)
        x = conv_bn_act(x, sd, f"ups.{j}.conv1", norm=not (official and j == num_scales - 1))
    y = F.conv2d(x, sd["head.weight"], sd["head.bias"])
    if official:
        rgb = torch.einsum("dc,bchw->bdhw", hand_decorrelation_matrix().to(y), y[:, :3])
        y = torch.cat([rgb, y[:, 3:]], dim=1)
    return torch.sigmoid(y)


def randomised(g):
    """Non-trivial BN affine parameters, so that every weight matters in the comparisons."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in g.named_parameters():
            if ".bn." in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1 if name.endswith("weight") else 0))
    return g


# ---- the official definition --------------------------------------------------------------

def expected_parameter_count(n, c_in=3, c_out=4, d=128, u=128, s=4, official=True):
    total, c = 0, c_in
    for _ in range(n):
        total += c * s + s + 2 * s  # 1x1 skip conv + BN
        total += c * 9 * d + d + 2 * d + d * 9 * d + d + 2 * d  # two 3x3 convs + BNs
        c = d
    for level in range(n):
        k = d if level == n - 1 else u
        total += 2 * (s + k) + (s + k) * 9 * u + u + 2 * u  # BN over the concat, 3x3 conv + BN
        total += u * u + u + (0 if official and level == 0 else 2 * u)  # 1x1 conv (+ BN)
    return total + u * c_out + c_out


def test_default_parameter_count_is_the_official_one():
    assert expected_parameter_count(7) == 3_115_548
    assert sum(p.numel() for p in Generator().parameters()) == 3_115_548
    assert sum(p.numel() for p in Generator(variant="legacy").parameters()) == 3_115_548 + 256
    small = Generator(**SMALL)
    assert sum(p.numel() for p in small.parameters()) == expected_parameter_count(3, d=8, u=6, s=2)


def test_decorrelation_matrix_is_a_fixed_buffer():
    g = Generator(**SMALL)
    assert torch.allclose(g.decorrelate.matrix.double(), hand_decorrelation_matrix(), atol=1e-7, rtol=0)
    assert dict(g.named_buffers())["decorrelate.matrix"] is g.decorrelate.matrix
    assert not any(n.startswith("decorrelate") for n, _ in g.named_parameters())
    assert not any(k.startswith("decorrelate") for k in g.state_dict())
    assert not list(Generator(**SMALL, variant="legacy").buffers())


def test_rgb_is_decorrelated_before_the_sigmoid_and_alpha_is_not():
    g = randomised(Generator(**SMALL)).double()
    head_out = {}
    g.head.register_forward_hook(lambda m, i, o: head_out.setdefault("y", o))
    out = g(torch.rand(2, 3, 20, 28, dtype=torch.float64))
    y = head_out["y"]  # [B, 4, H, W]
    rgb = torch.einsum("dc,bchw->bdhw", hand_decorrelation_matrix(), y[:, :3])
    assert out.dtype == torch.float32  # the head's output is cast to float32 before the sigmoid
    assert torch.allclose(out[:, :3].double(), torch.sigmoid(rgb), atol=1e-7, rtol=0)
    assert torch.allclose(out[:, 3:].double(), torch.sigmoid(y[:, 3:]), atol=1e-7, rtol=0)
    assert not torch.allclose(out[:, :3].double(), torch.sigmoid(y[:, :3]), atol=1e-3)


def test_every_spatial_conv_pads_by_reflection_in_official_and_zeros_in_legacy():
    for variant, mode in (("official", "reflect"), ("legacy", "zeros")):
        convs = [m for m in Generator(**SMALL, variant=variant).modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == 3 * 5 + 1
        for conv in convs:
            k = conv.kernel_size[0]
            assert conv.padding == ((k - 1) // 2,) * 2
            if k > 1:
                assert conv.padding_mode == mode


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_block_border_is_reflection_pad_then_unpadded_conv(stride):
    torch.manual_seed(0)
    g = randomised(Generator(**SMALL)).double()
    block = g.downs[1].body[0] if stride == 2 else g.downs[1].body[1]
    x = torch.randn(2, block.conv.in_channels, 9, 11, dtype=torch.float64)
    sd = {k: v for k, v in block.state_dict().items()}
    by_hand = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), sd["conv.weight"], sd["conv.bias"], stride=stride)
    by_hand = F.leaky_relu(batch_norm(by_hand, sd, "bn"), 0.2)
    out = block(x.clone())
    assert out.shape[-2:] == ((5, 6) if stride == 2 else (9, 11))
    assert torch.allclose(out, by_hand, atol=1e-12, rtol=0)
    zero_padded = F.conv2d(x, sd["conv.weight"], sd["conv.bias"], stride=stride, padding=1)
    assert not torch.allclose(out, F.leaky_relu(batch_norm(zero_padded, sd, "bn"), 0.2), atol=1e-3)


def test_only_the_full_resolution_1x1_up_conv_has_no_batchnorm():
    n = SMALL["num_scales"]
    official, legacy = Generator(**SMALL), Generator(**SMALL, variant="legacy")
    assert isinstance(official.ups[n - 1].conv1.bn, torch.nn.Identity)  # ups[n - 1] is level 0
    assert all(isinstance(up.conv1.bn, torch.nn.BatchNorm2d) for up in official.ups[:n - 1])
    assert all(isinstance(up.conv1.bn, torch.nn.BatchNorm2d) for up in legacy.ups)
    assert f"ups.{n - 1}.conv1.bn.weight" not in official.state_dict()
    assert set(legacy.state_dict()) - set(official.state_dict()) == {f"ups.{n - 1}.conv1.bn.weight",
                                                                      f"ups.{n - 1}.conv1.bn.bias"}


def bilinear_x2_matrix(n):
    """[2n, n]: align_corners=False x2 upsampling by hand: output o samples o / 2 - 0.25."""
    u = torch.zeros(2 * n, n, dtype=torch.float64)
    for o in range(2 * n):
        src = max(o / 2 - 0.25, 0.0)
        i0 = int(math.floor(src))
        i1, t = min(i0 + 1, n - 1), src - i0
        u[o, i0] += 1 - t
        u[o, i1] += t
    return u


def test_upsampling_doubles_then_cuts_the_excess_pixel_at_the_bottom_right():
    torch.manual_seed(0)
    up = UpBlock(c_in=2, c_skip=1, c_out=3, official=True, top=False).double()
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    skip = torch.randn(1, 1, 5, 7, dtype=torch.float64)  # odd: x2 gives 6x8, one pixel too many
    seen = {}
    up.bn.register_forward_pre_hook(lambda m, args: seen.setdefault("cat", args[0].clone()))
    up(x, skip)
    doubled = bilinear_x2_matrix(3) @ x @ bilinear_x2_matrix(4).T  # [1, 2, 6, 8]
    assert torch.allclose(seen["cat"], torch.cat([skip, doubled[..., :5, :7]], dim=1), atol=1e-12, rtol=0)
    legacy = F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=False)
    assert not torch.allclose(seen["cat"][:, 1:], legacy, atol=1e-3)


def test_crop_to_common_size_centres_larger_excesses():
    big, small = torch.arange(9 * 10.).view(1, 1, 9, 10), torch.zeros(1, 1, 6, 7)
    cropped, same = crop_to_common_size(big, small)
    assert same is small or torch.equal(same, small)
    assert torch.equal(cropped, big[..., 1:7, 1:8])  # offsets (9 - 6) // 2 and (10 - 7) // 2


@pytest.mark.parametrize("variant", ["official", "legacy"])
def test_whole_network_matches_the_reference_on_odd_sizes(variant):
    torch.manual_seed(0)
    g = randomised(Generator(**SMALL, variant=variant)).double()
    x = torch.rand(2, 3, 19, 27, dtype=torch.float64)
    ref = reference_generator(g.state_dict(), x, SMALL["num_scales"], official=variant == "official")
    assert torch.allclose(g(x).double(), ref, atol=1e-7, rtol=0)


# ---- legacy checkpoints ---------------------------------------------------------------------

def legacy_keys(n):
    """The state-dict keys of this repository's earlier generator, written out."""
    modules = []
    for i in range(n):
        modules += [f"downs.{i}.body.0.conv", f"downs.{i}.body.0.bn", f"downs.{i}.body.1.conv", f"downs.{i}.body.1.bn"]
    modules += [f"skips.{i}.{part}" for i in range(n) for part in ("conv", "bn")]
    for j in range(n):
        modules += [f"ups.{j}.bn", f"ups.{j}.conv3.conv", f"ups.{j}.conv3.bn", f"ups.{j}.conv1.conv", f"ups.{j}.conv1.bn"]
    return [f"{m}.{p}" for m in modules + ["head"] for p in ("weight", "bias")]


def test_legacy_variant_keeps_the_old_state_dict_keys():
    assert list(Generator(**SMALL, variant="legacy").state_dict()) == legacy_keys(3)
    assert list(Generator(variant="legacy").state_dict()) == legacy_keys(7)


def test_old_checkpoint_loads_as_legacy_and_renders_as_before(tmp_path):
    torch.manual_seed(0)
    trained = randomised(Generator(**SMALL, variant="legacy"))
    old_config = {k: SMALL[k] for k in ("num_scales", "skip_n33d", "skip_n33u", "skip_n11")}  # no "variant"
    torch.save({"generator": trained.state_dict(), "generator_config": old_config}, tmp_path / "model.pt")
    ckpt = torch.load(tmp_path / "model.pt", weights_only=False)
    g = generator_from_checkpoint(ckpt["generator_config"], ckpt["generator"])
    assert g.variant == "legacy"
    x = torch.rand(1, 3, 21, 30)
    assert torch.equal(g(x), trained(x))
    ref = reference_generator({k: v.double() for k, v in ckpt["generator"].items()}, x.double(), 3, official=False)
    assert torch.allclose(g(x).double(), ref, atol=1e-5, rtol=0)


def test_new_checkpoint_config_names_the_official_variant_and_round_trips():
    cfg = {**SMALL, "lr": 0.0025, "seed": 3}
    config = generator_config(cfg)
    assert config == {**SMALL, "variant": "official"}
    torch.manual_seed(0)
    trained = randomised(Generator(**config))
    g = generator_from_checkpoint(config, trained.state_dict())
    x = torch.rand(1, 3, 17, 23)
    assert g.variant == "official" and torch.equal(g(x), trained(x))


@pytest.mark.parametrize("case", ["legacy_weights_as_official", "official_weights_without_variant",
                                  "other_sizes", "unknown_variant"])
def test_weights_that_do_not_fit_are_a_one_line_error(case):
    legacy_sd = Generator(**SMALL, variant="legacy").state_dict()
    official_sd = Generator(**SMALL).state_dict()
    config, sd, expected = {
        "legacy_weights_as_official": ({**SMALL, "variant": "official"}, legacy_sd, "unexpected keys"),
        "official_weights_without_variant": (dict(SMALL), official_sd, "they fit the official variant"),
        "other_sizes": ({**SMALL, "skip_n33d": 16, "variant": "official"}, official_sd, "wrongly shaped"),
        "unknown_variant": ({**SMALL, "variant": "v2"}, official_sd, "unknown"),
    }[case]
    with pytest.raises(ValueError, match=expected) as info:
        generator_from_checkpoint(config, sd)
    assert "re-train with train_image.py" in str(info.value) and "\n" not in str(info.value)


# ---- any input size -------------------------------------------------------------------------

TINY7 = dict(num_scales=7, skip_n33d=8, skip_n33u=8, skip_n11=4)


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (60, 90), (100, 150)])
def test_small_inputs_give_full_size_outputs_and_gradients(size):
    torch.manual_seed(0)
    g = Generator(**TINY7)
    out = g(torch.rand(2, 3, *size))
    assert out.shape == (2, 4, *size)
    assert out.min() > 0 and out.max() < 1
    out.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


@pytest.mark.parametrize("variant", ["official", "legacy"])
@pytest.mark.parametrize("size", [(1, 1), (1, 5), (16, 16), (7, 300)])
def test_tiny_inputs_work_in_both_variants(variant, size):
    out = Generator(**TINY7, variant=variant)(torch.rand(1, 3, *size))
    assert out.shape == (1, 4, *size) and torch.isfinite(out).all()


def network_input_shapes(g, x):
    shapes = []
    hook = g.downs[0].register_forward_pre_hook(lambda m, args: shapes.append(args[0]))
    out = g(x)
    hook.remove()
    return out, shapes[0]


def test_padding_is_centred_reflection_or_replication_and_cropped_away():
    torch.manual_seed(0)
    g = Generator(**TINY7).double()
    x = torch.rand(1, 3, 100, 150, dtype=torch.float64)  # 129 - 100 = 29 rows: 14 above, 15 below
    out, seen = network_input_shapes(g, x)
    assert seen.shape[-2:] == (129, 150)
    padded = F.pad(x, (0, 0, 14, 15), mode="reflect")
    assert torch.equal(seen, padded)
    assert torch.allclose(out, g(padded)[..., 14:114, :], atol=1e-12, rtol=0)
    x = torch.rand(1, 3, 32, 40, dtype=torch.float64)  # 97 / 89 px of padding: more than the image has
    out, seen = network_input_shapes(g, x)
    padded = F.pad(x, (44, 45, 48, 49), mode="replicate")
    assert torch.equal(seen, padded)
    assert torch.allclose(out, g(padded)[..., 48:80, 44:84], atol=1e-12, rtol=0)


def test_large_enough_input_takes_the_plain_path():
    torch.manual_seed(0)
    g = randomised(Generator(**TINY7)).double()
    x = torch.rand(1, 3, 256, 256, dtype=torch.float64)  # 2 x 2 at the deepest level
    out, seen = network_input_shapes(g, x)
    assert not g.needs_padding(x.shape) and torch.equal(seen, x)
    assert torch.allclose(out.double(), reference_generator(g.state_dict(), x, 7, official=True), atol=1e-7, rtol=0)


def test_legacy_pads_only_what_its_old_code_refused():
    g = Generator(**TINY7, variant="legacy")
    assert not g.needs_padding((1, 3, 16, 300))  # deepest 1 x 3: the old code ran this
    assert g.needs_padding((1, 3, 16, 16)) and not g.needs_padding((2, 3, 16, 16))


# ---- general --------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(97, 131), (130, 72)])
def test_default_generator_any_size_in_same_size_out_alpha_in_unit_range(size):
    torch.manual_seed(0)
    g = Generator()
    with torch.no_grad():
        out = g(torch.rand(1, 3, *size))
    colour, alpha = split_edit_layer(out)
    assert out.shape == (1, 4, *size)
    assert colour.shape == (1, 3, *size) and alpha.shape == (1, 1, *size)
    assert out.min() >= 0 and out.max() <= 1


def test_architecture_follows_the_config():
    g = Generator(num_scales=3, skip_n33d=16, skip_n33u=8, skip_n11=2)
    assert len(g.downs) == 3 and len(g.ups) == 3
    assert g.downs[0].body[0].conv.out_channels == 16 and g.downs[0].body[0].conv.stride == (2, 2)
    assert g.skips[0].conv.out_channels == 2 and g.skips[0].conv.kernel_size == (1, 1)
    assert g.ups[-1].conv3.conv.in_channels == 8 + 2 and g.head.out_channels == 4
    assert g.ups[0].bn.num_features == 16 + 2  # the deepest level concatenates the down path's output
    bns = [m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.track_running_stats for m in bns)
    assert all(m.negative_slope == 0.2 for m in g.modules() if isinstance(m, torch.nn.LeakyReLU))


def test_gradients_reach_every_parameter():
    g = Generator(num_scales=3, skip_n33d=8, skip_n33u=8)
    g(torch.rand(1, 3, 40, 56)).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        Generator(variant="v2")
