"""Each loss is zero (or minimal) where it must be, and gradients go where they must."""


import pytest
import torch

from losses import terms as losses
from losses.clip_views import make_views, sample_view_params, view_size
from losses.relevancy import bootstrap_maps, relevancy_map
from util import compositing


def test_composite_and_green():
    colour, image = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    assert torch.equal(compositing.composite(colour, torch.zeros(1, 1, 8, 8), image), image)
    assert torch.equal(compositing.composite(colour, torch.ones(1, 1, 8, 8), image), colour)
    green = compositing.over_green(colour, torch.zeros(1, 1, 8, 8))
    assert torch.allclose(green[0, :, 0, 0], torch.tensor([0.0, 177 / 255, 64 / 255]))


@pytest.mark.parametrize("criterion", ["spherical", "cosine"])
def test_text_loss_zero_for_identical_and_grows_with_angle(criterion):
    e = torch.randn(4, 16)
    assert losses.text_loss(e, 3 * e, criterion).abs() < 1e-5
    assert losses.text_loss(e, -e, criterion) > losses.text_loss(e, e + 0.3 * torch.randn(4, 16), criterion)


def test_spherical_distance_formula():
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # 90 degrees apart: chord sqrt(2), 2*arcsin(sqrt(2)/2)^2 = 2*(pi/4)^2
    assert torch.allclose(losses.text_distance(x, y, "spherical"), torch.tensor([2 * (torch.pi / 4) ** 2]))


def test_directional_loss_zero_when_image_moves_like_the_text():
    src_txt, tgt_txt = torch.randn(3, 8), torch.randn(3, 8)
    src_txt, tgt_txt = torch.nn.functional.normalize(src_txt, dim=-1), torch.nn.functional.normalize(tgt_txt, dim=-1)
    assert losses.directional_loss(tgt_txt, src_txt, tgt_txt, src_txt) < 1e-5
    assert losses.directional_loss(src_txt, tgt_txt, tgt_txt, src_txt) > 1.9  # the opposite direction


def test_structure_loss_zero_for_same_tokens_gradient_to_output_only():
    tokens_in = torch.randn(1, 10, 16, requires_grad=True)
    tokens_out = (tokens_in.detach() * 2).requires_grad_(True)  # same directions: same self-similarity
    for kind in ("mse", "fro"):
        assert losses.structure_loss(tokens_out, tokens_in, kind) < 1e-6
    loss = losses.structure_loss(tokens_out + torch.randn(1, 10, 16), tokens_in, "mse")
    assert loss > 0
    loss.backward()
    assert tokens_out.grad is not None and tokens_in.grad is None


def test_sparsity_is_zero_for_empty_alpha_and_grows():
    zero = torch.zeros(1, 1, 8, 8)
    assert losses.sparsity_loss(zero, 0.01, 0.01) == 0
    assert losses.sparsity_loss(zero + 0.5, 0.01, 0.01) < losses.sparsity_loss(zero + 1, 0.01, 0.01)


def test_bootstrap_loss_and_schedule():
    m = torch.rand(1, 1, 8, 8)
    assert losses.bootstrap_loss(m, m) == 0
    assert losses.bootstrap_weight(0, 10, 0, 100, "linear") == pytest.approx(9.9)
    assert losses.bootstrap_weight(49, 10, 0, 100, "linear") == pytest.approx(5)
    assert losses.bootstrap_weight(100, 10, 0, 100, "linear") == 0
    assert losses.bootstrap_weight(50, 10, 0, 100, "none") == 10
    assert 0 < losses.bootstrap_weight(50, 10, 0, 100, "exponential") < 10
    assert losses.bootstrap_weight(5, 10, 0, -1, "linear") == 0


def test_shared_views_share_parameters_and_have_the_batched_size():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 120, 180)
    hw = view_size(120, 180)
    assert hw == (213, 320)
    params = sample_view_params(6, (120, 180), hw, g)
    va, vb = make_views([a, a.clone()], params, hw, fill=1.0)
    assert va.shape == (6, 3, 213, 320) and torch.equal(va, vb)
    assert va.min() >= 0 and va.max() <= 1
    # the first view is the whole image: flat colour in gives that colour out (if not jittered/gray)
    flat = torch.full((1, 3, 120, 180), 0.25)
    params.do_jitter[:] = False
    params.gray[:] = False
    (v,) = make_views([flat], params, hw, fill=0.25)
    assert torch.allclose(v, torch.full_like(v, 0.25), atol=1e-5)


def test_relevancy_map_shape_range_and_text_dependence(tiny_clip):
    torch.manual_seed(0)
    image = torch.rand(1, 3, 224, 224)
    t1, t2 = torch.randn(64), torch.randn(64)
    r1 = relevancy_map(tiny_clip, image, t1, num_layers=9)
    r2 = relevancy_map(tiny_clip, image, t2, num_layers=9)
    assert r1.shape == (1, 1, 224, 224)
    assert r1.min() == 0 and r1.max() == pytest.approx(1)
    assert (r1 - r2).abs().max() > 1e-3
    assert not r1.requires_grad
    positive, negative = bootstrap_maps(tiny_clip, image, torch.stack([t1]), torch.stack([t2]), 9)
    assert torch.allclose(positive, r1) and torch.allclose(negative[0], r2)
    assert bootstrap_maps(tiny_clip, image, torch.stack([t1]), (), 9)[1] is None
    with pytest.raises(ValueError, match="relevancy_num_layers"):
        relevancy_map(tiny_clip, image, t1, num_layers=11)
