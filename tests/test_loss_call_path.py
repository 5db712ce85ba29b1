"""The loss as training calls it, term by term, against an independent computation.

Piece-by-piece tests (test_losses.py, test_fidelity.py) pin each pure function; here the whole
`Text2LiveLoss.__call__` runs on a tiny CLIP, and every term it returns is recomputed by hand
from the same random draws: which image's views feed which term, which texts, which tokens, in
which order. A wrong composition of correct pieces (the structure term once took the
self-similarity of self-similarity matrices) fails here.
"""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from losses.clip_loss import SCREEN_TEMPLATES, TEXT_TEMPLATES, Text2LiveLoss
from losses.clip_views import make_views, sample_view_params
from losses.relevancy import relevancy_map
from models.tokenizer import tokenize
from util.config import load_config
from util.crops import random_size_crop

GREEN = torch.tensor([0, 177, 64]).view(1, 3, 1, 1) / 255
COMP, SRC, SCREEN = ["golden cat", "shiny cat"], ["cat", "kitten"], ["golden fur"]
BOOT, NEGATIVE = "cat", ["table", "floor"]


def call_path_config():
    return load_config("image", overrides=[
        f"comp_text={COMP}", f"src_text={SRC}", f"screen_text={SCREEN}", f"bootstrap_text={BOOT}",
        "use_negative_bootstrap=true", f"bootstrap_negative_text={NEGATIVE}",
        "bootstrap_negative_map_threshold=0.3", "bootstrap_epoch=10", "bootstrapping_min_cover=0.8",
        "relevancy_num_layers=9", "n_aug=3", "mixed_precision=off", "lambda_structure=2.5"])


def text_embeddings(clip, texts, templates):
    with torch.no_grad():
        return {(text, tpl): clip.encode_text(tokenize([tpl.format(text)]))[0].float()
                for text in texts for tpl in templates}


def spherical(x, y):  # rows of x against rows of y, by the formula
    x, y = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
    return (2 * torch.arcsin((x - y).norm(dim=-1) / 2) ** 2).mean()


def last_block_tokens(clip, image):
    """Tokens entering the last block for `image` resized to short side 224 (long <= 380), by hand."""
    h, w = image.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = min(int(224 * long / short), 380)
    new_short = int(new_long * short / long) if new_long == 380 else 224
    size = (new_short, new_long) if h <= w else (new_long, new_short)
    x = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    v = clip.visual
    x = v.conv1(clip.normalize(x))  # [1, W, gh, gw]
    gh, gw = x.shape[-2:]
    t = torch.cat([v.class_embedding.view(1, 1, -1), x.flatten(2).transpose(1, 2)], 1)  # [1, 1 + gh * gw, W]
    t = v.ln_pre(t + v.position_embedding_for(gh, gw))
    for block in v.transformer.resblocks[:-1]:
        t, _ = block(t)
    return t  # [1, 1 + gh * gw, W]


def cosine_self_similarity(t):
    n = t.norm(dim=-1, keepdim=True)
    return (t @ t.transpose(1, 2)) / (n @ n.transpose(1, 2)).clamp(min=1e-8)


def expected_terms(clip, cfg, image, colour, alpha, seed, step, opacity=None):
    """Every term of one call, recomputed from the pure definitions and the same random draws."""
    V = cfg["n_aug"]
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    output = alpha * colour + (1 - alpha) * image
    green = alpha * colour + (1 - alpha) * GREEN
    if opacity is not None:  # a video's foreground: seen through the object's opacity
        output, green, alpha = opacity * output, opacity * green + (1 - opacity) * GREEN, alpha * opacity
    h, w = image.shape[-2:]
    view_hw = (213, 320) if (h, w) == (120, 180) else None
    assert view_hw is not None, "the test's view size is written for a 120x180 input"
    # each image draws its own views, in the order composite, green screen, input
    params = [sample_view_params(V, (h, w), view_hw, g) for _ in range(3)]
    out_views, green_views, in_views = make_views([output, green, image], params, view_hw,
                                                  fill=cfg["clip_affine_transform_fill"])
    with torch.no_grad():
        emb_in = clip.encode_image(in_views).float()
    emb_out, emb_green = clip.encode_image(out_views).float(), clip.encode_image(green_views).float()

    comp = text_embeddings(clip, COMP, TEXT_TEMPLATES)
    src = text_embeddings(clip, SRC, TEXT_TEMPLATES)
    screen = text_embeddings(clip, SCREEN, SCREEN_TEMPLATES)
    k = [rng.randrange(len(COMP)) for _ in range(V)]
    t = [rng.randrange(len(TEXT_TEMPLATES)) for _ in range(V)]
    comp_rows = torch.stack([comp[COMP[a], TEXT_TEMPLATES[b]] for a, b in zip(k, t)])
    kd = [rng.randrange(min(len(COMP), len(SRC))) for _ in range(V)]
    td = [rng.randrange(len(TEXT_TEMPLATES)) for _ in range(V)]
    target_dir = torch.stack([comp[COMP[a], TEXT_TEMPLATES[b]] - src[SRC[a], TEXT_TEMPLATES[b]]
                              for a, b in zip(kd, td)])
    ks = [rng.randrange(len(SCREEN)) for _ in range(V)]
    ts = [rng.randrange(len(SCREEN_TEMPLATES)) for _ in range(V)]
    screen_rows = torch.stack([screen[SCREEN[a], SCREEN_TEMPLATES[b]] for a, b in zip(ks, ts)])

    terms = {
        "comp_text": spherical(emb_out, comp_rows),
        "comp_dir": (1 - F.cosine_similarity(emb_out - emb_in, target_dir, dim=-1)).mean(),
        "screen": spherical(emb_green, screen_rows),
    }
    with torch.no_grad():
        target = cosine_self_similarity(last_block_tokens(clip, image))
    terms["structure"] = ((cosine_self_similarity(last_block_tokens(clip, output)) - target) ** 2).mean()
    terms["sparsity"] = 0.01 * alpha.mean() + 0.01 * (2 * torch.sigmoid(5 * alpha) - 1).mean()

    top, left, ch, cw = random_size_crop(h, w, cfg["bootstrapping_min_cover"], rng)
    crop = F.interpolate(image[..., top:top + ch, left:left + cw], size=(224, 224), mode="bilinear",
                         align_corners=False, antialias=True)
    alpha_crop = F.interpolate(alpha[..., top:top + ch, left:left + cw], size=(224, 224), mode="bilinear",
                               align_corners=False, antialias=True)
    with torch.no_grad():
        boot_emb = clip.encode_text(tokenize([BOOT]))[0].float()
        positive = relevancy_map(clip, crop, boot_emb, 9)
        negatives = [relevancy_map(clip, crop, clip.encode_text(tokenize([n]))[0].float(), 9) for n in NEGATIVE]
    negative_terms = []
    for r in negatives:  # where a negative text is relevant, 1 - alpha follows its map
        m = (r > 0.3).float()
        negative_terms.append((((1 - alpha_crop) * m - r * m) ** 2).mean())
    # the negative texts' terms are averaged (one MSE over all their maps), then added to the positive
    terms["bootstrap"] = ((alpha_crop - positive) ** 2).mean() + sum(negative_terms) / len(negative_terms)
    lambda_boot = 10.0 * (1 - (step + 1) / 10)  # the linear schedule
    weights = {"comp_text": 1.0, "comp_dir": 1.0, "screen": 1.0, "structure": 2.5, "sparsity": 6.0,
               "bootstrap": lambda_boot}
    total = sum(weights[name] * value for name, value in terms.items())
    return total, terms, lambda_boot


@pytest.fixture
def edit_inputs():
    torch.manual_seed(4)
    image = (torch.rand(1, 3, 120, 180) * 255).round() / 255
    colour = torch.rand(1, 3, 120, 180, requires_grad=True)
    alpha = torch.rand(1, 1, 120, 180, requires_grad=True)
    return image, colour, alpha


@pytest.mark.parametrize("with_opacity", [False, True], ids=["image", "video-foreground"])
def test_every_term_of_the_call_equals_its_definition(tiny_clip, edit_inputs, with_opacity):
    image, colour, alpha = edit_inputs
    opacity = torch.rand(1, 1, 120, 180) if with_opacity else None
    cfg, seed, step = call_path_config(), 7, 2
    loss_fn = Text2LiveLoss(tiny_clip, cfg, "cpu")
    total, logged = loss_fn(image, colour, alpha, step, random.Random(seed), torch.Generator().manual_seed(seed),
                            opacity=opacity)
    expected_total, expected, lambda_boot = expected_terms(tiny_clip, cfg, image, colour, alpha, seed, step, opacity)

    assert set(logged) == set(expected) | {"lambda_bootstrap"}
    assert logged["lambda_bootstrap"] == pytest.approx(lambda_boot)
    for name, value in expected.items():
        assert logged[name] == pytest.approx(float(value.detach()), rel=1e-4, abs=1e-6), name
    assert float(total.detach()) == pytest.approx(float(expected_total.detach()), rel=1e-4)

    # the gradients reach colour and alpha as the independent total's do
    got = torch.autograd.grad(total, [colour, alpha])
    want = torch.autograd.grad(expected_total, [colour, alpha])
    for g_got, g_want in zip(got, want):
        assert torch.allclose(g_got, g_want, rtol=1e-3, atol=1e-7)


def test_the_structure_term_takes_the_self_similarity_once(tiny_clip, edit_inputs):
    """MSE(S(tokens_out), S(tokens_in)), not the same of S(S(.)): the two differ by far more than
    the tolerance above, so the call-path test would catch the old composition."""
    image, colour, alpha = edit_inputs
    cfg = load_config("image", overrides=["comp_text=golden cat", "n_aug=2", "mixed_precision=off"])
    _, logged = Text2LiveLoss(tiny_clip, cfg, "cpu")(image, colour, alpha, 0, random.Random(0),
                                                      torch.Generator().manual_seed(0))
    output = alpha * colour + (1 - alpha) * image
    with torch.no_grad():
        s_out = cosine_self_similarity(last_block_tokens(tiny_clip, output))
        s_in = cosine_self_similarity(last_block_tokens(tiny_clip, image))
    once = float(((s_out - s_in) ** 2).mean())
    twice = float(((cosine_self_similarity(s_out) - cosine_self_similarity(s_in)) ** 2).mean())
    assert logged["structure"] == pytest.approx(once, rel=1e-4)
    assert not math.isclose(once, twice, rel_tol=1e-2)
    fro = Text2LiveLoss(tiny_clip, {**cfg, "structure_loss": "fro"}, "cpu")
    _, logged_fro = fro(image, colour, alpha, 0, random.Random(0), torch.Generator().manual_seed(0))
    assert logged_fro["structure"] == pytest.approx(float((s_out - s_in).flatten(1).norm(dim=-1).mean()), rel=1e-4)


def test_the_training_step_feeds_the_loss_the_generator_output_split_as_colour_and_alpha(tiny_clip):
    """train_step: per input, loss(x, output[:, :3], output[:, 3:]) and the mean of the totals."""
    from models.generator import Generator, generator_config
    from training.image import train_step

    cfg = load_config("image", overrides=["comp_text=golden cat", "src_text=cat", "n_aug=2",
                                          "mixed_precision=off", "num_scales=3", "skip_n33d=8", "skip_n33u=8"])
    torch.manual_seed(0)
    generator = Generator(**generator_config(cfg))
    batch = [torch.rand(1, 3, 64, 96), torch.rand(1, 3, 48, 80)]
    loss_fn = Text2LiveLoss(tiny_clip, cfg, "cpu")
    expected = []
    rng, g = random.Random(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        for x in batch:
            out = generator(x)
            expected.append(float(loss_fn(x, out[:, :3], out[:, 3:4], 3, rng, g)[0]))
    optimizer = torch.optim.SGD(generator.parameters(), lr=0.0)
    total, _ = train_step(generator, optimizer, loss_fn, batch, 3, random.Random(5), torch.Generator().manual_seed(5))
    assert total == pytest.approx(sum(expected) / len(batch), rel=1e-5)
