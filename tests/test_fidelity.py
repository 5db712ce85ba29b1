"""The official Text2LIVE definitions, pinned term by term with numbers computed in each test.

Each test fails if the matching item of the "faithful by default" list regresses to our old
definition. Generator items live in test_generator.py, example configs at the end here.
"""

import copy
import math
import random

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.image_dataset import ImageDataset
from losses import terms as losses
from losses.clip_loss import Text2LiveLoss
from losses.clip_views import make_views, sample_crops, sample_view_params, view_size
from losses.relevancy import relevancy_map
from util import compositing
from util.config import load_config
from util.crops import random_size_crop
from util.image_io import resize_short_side


def loss_config(**overrides):
    items = ["comp_text=golden cat", "src_text=cat", "screen_text=golden cat", "n_aug=3",
             "bootstrap_epoch=-1", "mixed_precision=off"]
    return load_config("image", overrides=items + [f"{k}={v}" for k, v in overrides.items()])


def run_loss(clip, cfg, image, colour, alpha, seed=0, step=0, **kw):
    loss_fn = Text2LiveLoss(clip, cfg, "cpu")
    return loss_fn(image, colour, alpha, step, random.Random(seed), torch.Generator().manual_seed(seed), **kw)


@pytest.fixture
def small_edit():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 96)
    return image, torch.rand(1, 3, 64, 96), torch.rand(1, 1, 64, 96)


# ---- 1. structure loss ----------------------------------------------------------------------

def test_self_similarity_formula_on_a_2x3_token_matrix():
    tokens = torch.tensor([[[1.0, 0.0, 0.0], [3.0, 4.0, 0.0]]])  # [1, 2, 3]
    expected = torch.tensor([[[1.0, 0.6], [0.6, 1.0]]])  # 3 / (1 * 5) off the diagonal
    assert torch.allclose(losses.self_similarity(tokens), expected)
    zero = torch.zeros(1, 2, 3)  # the official eps clamp: 0 / max(0, 1e-8) = 0, not NaN
    assert torch.equal(losses.self_similarity(zero), torch.zeros(1, 2, 2))


def test_structure_loss_uses_the_tokens_entering_the_last_block_with_cls(tiny_clip):
    torch.manual_seed(1)
    image = torch.rand(1, 3, 512, 768)
    size = view_size(512, 768, long_max=380)
    assert size == (224, 336)  # short side 224, long side int(224 * 1.5) = 336 <= 380
    x = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    v = tiny_clip.visual
    t = v.conv1(tiny_clip.normalize(x)).flatten(2).transpose(1, 2)  # [1, 70, W]: 7 x 10 patches
    t = torch.cat([v.class_embedding.expand(1, 1, -1), t], 1) + v.position_embedding_for(7, 10)
    t = v.ln_pre(t)
    for block in v.transformer.resblocks[:-1]:  # all blocks but the last
        t, _ = block(t)
    norms = t.norm(dim=-1, keepdim=True)
    expected = (t @ t.transpose(1, 2)) / (norms @ norms.transpose(1, 2))
    loss_fn = Text2LiveLoss(tiny_clip, loss_config(), "cpu")
    got = losses.self_similarity(loss_fn.structure_tokens(image))
    assert got.shape == (1, 71, 71)  # CLS included
    assert torch.allclose(got, expected, atol=1e-5)


# ---- 2. and 3. CLIP views --------------------------------------------------------------------

def test_view_sizes_follow_torchvision_resize_with_max_size():
    assert view_size(512, 768) == (213, 320)  # 336 > 320: long 320, short int(320 * 224 / 336)
    assert view_size(768, 512) == (320, 213)
    assert view_size(300, 400) == (224, 298)  # int(224 * 4 / 3) = 298 <= 320
    assert view_size(224, 224) == (224, 224)


def test_view_crops_scale_both_sides_by_one_factor_and_the_first_is_whole():
    g = torch.Generator().manual_seed(0)
    boxes = sample_crops(200, (120, 180), g)
    assert boxes[0].tolist() == [0, 0, 120, 180]
    top, left, h, w = boxes[1:].unbind(1)
    s = h.double() / 120
    assert (s >= 0.6 - 1e-9).all() and (s < 1).all()
    assert ((w.double() / 180 - s).abs() <= 1 / 120 + 1 / 180).all()  # one s for both sides, truncated
    assert (top >= 0).all() and (top + h <= 120).all() and (left + w <= 180).all()


def test_each_image_gets_its_own_views_unless_shared():
    image = torch.rand(1, 3, 60, 90)
    hw = view_size(60, 90)
    g = torch.Generator().manual_seed(0)
    own = make_views([image, image.clone()], [sample_view_params(4, (60, 90), hw, g) for _ in range(2)], hw)
    assert not torch.allclose(own[0][1:], own[1][1:])
    shared = make_views([image, image.clone()], sample_view_params(4, (60, 90), hw, g), hw)
    assert torch.equal(shared[0], shared[1])


# ---- 4. directional loss ----------------------------------------------------------------------

def test_directional_loss_on_raw_embeddings():
    out, inp = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    target, source = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    # raw: image direction (2, -1), text direction (1, 0): cos = 2 / sqrt(5)
    assert losses.directional_loss(out, inp, target, source) == pytest.approx(1 - 2 / math.sqrt(5), abs=1e-6)
    # normalised first (directional_normalize): (1, -1) against (0.7071, -0.2929)
    a, b = torch.tensor([1.0, -1.0]), torch.tensor([2 ** -0.5, 2 ** -0.5 - 1])
    expected = 1 - float(a @ b / (a.norm() * b.norm()))
    assert losses.directional_loss(out, inp, target, source, normalize=True) == pytest.approx(expected, abs=1e-6)


# ---- 6. negative bootstrap, 7. schedules, 8. colours and criteria -----------------------------

def test_negative_bootstrap_term_on_a_2x3_map():
    alpha = torch.tensor([[0.2, 0.5, 0.9], [0.0, 1.0, 0.4]]).view(1, 1, 2, 3)
    positive = torch.tensor([[0.0, 0.5, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 2, 3)
    negative = torch.tensor([[0.7, 0.1, 0.9], [0.3, 0.65, 0.0]]).view(1, 1, 1, 2, 3)
    # positive MSE: (0.2^2 + 0 + 0.1^2 + 0 + 0 + 0.4^2) / 6
    pos = (0.04 + 0.01 + 0.16) / 6
    # mask where r- > 0.6: (0,0), (0,2), (1,1); (1 - alpha) - r- there: 0.8-0.7, 0.1-0.9, 0-0.65
    neg = (0.1 ** 2 + 0.8 ** 2 + 0.65 ** 2) / 6
    got = losses.bootstrap_loss(alpha, positive, negative, negative_threshold=0.6)
    assert float(got) == pytest.approx(pos + neg, abs=1e-6)
    assert float(losses.bootstrap_loss(alpha, positive)) == pytest.approx(pos, abs=1e-6)


def test_bootstrap_schedules_are_the_official_ones():
    # exponential: lambda <- 0.99 * lambda at every step, the first included
    assert losses.bootstrap_weight(100, 10, 0, 1000, "exponential") == pytest.approx(10 * 0.99 ** 101)
    assert losses.bootstrap_weight(100, 10, 0, 1000, "exponential") == pytest.approx(3.62, abs=0.01)
    assert losses.bootstrap_weight(0, 10, 0, 1000, "exponential") == pytest.approx(9.9)
    assert losses.bootstrap_weight(500, 10, 0.5, 1000, "exponential") == 0.5  # floored
    # linear: lambda_0 * (1 - (t + 1) / bootstrap_epoch)
    assert losses.bootstrap_weight(0, 10, 0, 1000, "linear") == pytest.approx(9.99)
    assert losses.bootstrap_weight(249, 10, 0, 1000, "linear") == pytest.approx(7.5)
    assert losses.bootstrap_weight(999, 10, 0, 1000, "linear") == 0
    assert losses.bootstrap_weight(1000, 10, 0, 1000, "none") == 0


def test_green_screen_pixel_and_cosine_scale():
    green = compositing.over_green(torch.rand(1, 3, 2, 2), torch.zeros(1, 1, 2, 2))
    assert (green * 255).round()[0, :, 0, 0].tolist() == [0, 177, 64]
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert float(losses.text_distance(x, y, "cosine")) == pytest.approx(1.2)  # 1.2 * (1 - 0)


def test_bootstrap_alpha_is_resized_with_antialiasing(tiny_clip, monkeypatch):
    import losses.clip_loss as clip_loss
    monkeypatch.setattr(clip_loss, "bootstrap_maps", lambda clip, crop, *a: (torch.zeros(1, 1, 224, 224), None))
    cfg = loss_config(bootstrap_text="cat", bootstrap_epoch=10)
    loss_fn = Text2LiveLoss(tiny_clip, cfg, "cpu")
    torch.manual_seed(0)
    alpha = torch.rand(1, 1, 500, 500)  # noise: antialiasing averages it much more than 2x2 bilinear taps
    got = loss_fn.bootstrap_term(torch.rand(1, 3, 500, 500), alpha, random.Random(0))
    expected = F.interpolate(alpha, size=(224, 224), mode="bilinear", align_corners=False, antialias=True).pow(2).mean()
    plain = F.interpolate(alpha, size=(224, 224), mode="bilinear", align_corners=False).pow(2).mean()
    assert float(got) == pytest.approx(float(expected), abs=1e-6)
    assert abs(float(expected) - float(plain)) > 0.01


def test_relevancy_gradient_is_taken_of_the_logit_scaled_similarity(tiny_clip):
    torch.manual_seed(0)
    image, text = torch.rand(1, 3, 224, 224), torch.randn(64)
    scaled = copy.deepcopy(tiny_clip)
    scaled.logit_scale.data.fill_(math.log(3.0))
    one_block = relevancy_map(tiny_clip, image, text, num_layers=10)  # min-max cancels the scale
    assert torch.allclose(one_block, relevancy_map(scaled, image, text, num_layers=10), atol=1e-5)
    three_blocks = relevancy_map(tiny_clip, image, text, num_layers=8)  # R composes: the scale matters
    assert (three_blocks - relevancy_map(scaled, image, text, num_layers=8)).abs().max() > 1e-4


# ---- 9. input crops and rescale ---------------------------------------------------------------

def test_input_crops_keep_the_aspect_and_sizes_truncate():
    rng = random.Random(0)
    for _ in range(100):
        top, left, h, w = random_size_crop(100, 150, 0.85, rng)
        c = h / 100
        assert 0.85 <= c + 0.01 and int(150 * c + 1e-9) - 1 <= w <= int(150 * c) + 1
        assert top + h <= 100 and left + w <= 150
    assert random_size_crop(100, 150, 1.0, rng) == (0, 0, 100, 150)


def pil_bilinear(image, size):
    """The official resize: Pillow's bilinear filter on the 8-bit image; size (h, w)."""
    array = (image[0].permute(1, 2, 0) * 255).round().byte().numpy()
    out = np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR))
    return torch.from_numpy(out.copy()).permute(2, 0, 1)[None].float() / 255


def test_resize_input_is_pillows_bilinear_with_truncated_size():
    photo = torch.from_numpy(np.asarray(skimage.data.chelsea()).copy()).permute(2, 0, 1)[None].float() / 255
    out = resize_short_side(photo, 96)  # 300x451, shrinking
    assert out.shape[-2:] == (96, 144)  # int(96 * 451 / 300) = int(144.32)
    assert torch.equal(out, pil_bilinear(photo, (96, 144)))  # bit-identical, not one level off
    up = resize_short_side(photo, 512)  # enlarging
    assert up.shape[-2:] == (512, 769) and torch.equal(up, pil_bilinear(photo, (512, 769)))
    # the old imitation (antialiased interpolate, rounded) lands many pixels one level off
    imitation = (F.interpolate(photo, size=(96, 144), mode="bilinear", align_corners=False, antialias=True)
                 .clamp(0, 1) * 255).round() / 255
    assert (imitation != out).float().mean() > 0.01


def test_dataset_scale_is_pillows_bilinear_with_truncated_sizes():
    cfg = load_config("image", overrides=["jitter_p=0", "flip_p=0", "scale_min=0.9", "scale_max=0.9",
                                          "crops_min_cover=1"])
    image = (torch.rand(1, 3, 50, 77) * 255).round() / 255
    crop = ImageDataset(image, cfg).augment(random.Random(0))
    assert crop.shape[-2:] == (45, 69)  # int(50 * 0.9), int(77 * 0.9) = int(69.3)
    assert torch.equal(crop, pil_bilinear(image, (45, 69)))


# ---- 10. video: foreground opacity ------------------------------------------------------------

def test_foreground_opacity_multiplies_composite_and_alpha(tiny_clip, small_edit):
    image, colour, alpha = small_edit
    cfg = loss_config(lambda_screen=0, src_text="null", lambda_structure=0)
    _, seen = run_loss(tiny_clip, cfg, image, colour, alpha, opacity=torch.zeros(1, 1, 64, 96))
    assert seen["sparsity"] == 0  # alpha * 0
    _, full = run_loss(tiny_clip, cfg, image, colour, alpha, opacity=torch.ones(1, 1, 64, 96))
    _, none = run_loss(tiny_clip, cfg, image, colour, alpha)
    assert full == pytest.approx(none)


# ---- switches: each changes the result; the defaults are the official definitions ------------

@pytest.mark.parametrize("switch", ["shared_clip_views", "directional_normalize", "clip_pos_embed_official"])
def test_every_switch_changes_the_loss(tiny_clip, small_edit, switch):
    image, colour, alpha = small_edit
    default, _ = run_loss(copy.deepcopy(tiny_clip), loss_config(), image, colour, alpha)
    switched, _ = run_loss(copy.deepcopy(tiny_clip), loss_config(**{switch: "true"}), image, colour, alpha)
    assert loss_config()[switch] is False
    assert abs(float(default) - float(switched)) > 1e-6


def test_official_position_embedding_swaps_height_and_width(tiny_clip):
    v = copy.deepcopy(tiny_clip.visual)
    correct = v.position_embedding_for(7, 10)
    v.official_pos_embed = True
    swapped = v.position_embedding_for(7, 10)
    grid = v.positional_embedding[1:].reshape(1, 7, 7, -1).permute(0, 3, 1, 2)
    # the official call: scale factors (10.1 / 7, 7.1 / 7) -> a 10 x 7 grid read as 7 rows of 10
    ref = F.interpolate(grid, scale_factor=(10.1 / 7, 7.1 / 7), mode="bicubic", align_corners=False)
    assert ref.shape[-2:] == (10, 7)
    assert torch.allclose(swapped[1:], ref.permute(0, 2, 3, 1).reshape(70, -1), atol=1e-6)
    assert not torch.allclose(swapped, correct)
    assert torch.equal(v.position_embedding_for(7, 7), tiny_clip.visual.positional_embedding)


# ---- 11. example configs carry the official texts and values -----------------------------------

def test_example_configs_are_the_official_ones():
    winter = load_config("video", example="lucia_winter.yaml")
    assert winter["comp_text"] == ["winter in park", "snowy park", "beautiful snow at city park"]
    assert winter["src_text"] == ["park", "city park"] and winter["crops_min_cover"] == 0.95
    rusty = load_config("video", example="car-turn_rusty.yaml")
    assert rusty["bootstrap_text"] == "car" and rusty["bootstrap_epoch"] == 3000
    assert load_config("video", example="car-turn_nighttime.yaml")["n_epochs"] == 1500
    assert load_config("video", example="blackswan_gold.yaml")["maximum_number_of_frames"] == 50
    assert load_config("video", example="libby_gold.yaml")["maximum_number_of_frames"] == 49
    horse = load_config("image", example="golden_horse.yaml")
    assert (horse["comp_text"], horse["src_text"], horse["bootstrap_text"]) == ("golden horse", "horse", "horse")
