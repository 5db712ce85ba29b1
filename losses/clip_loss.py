"""All of Text2LIVE's CLIP losses for one training input, as the official code defines them.

Per input image (an augmented crop, or the whole image), with n_aug CLIP views each:
  - composition: text loss of the composite's views against "<comp_text>" in random templates,
    and the directional loss (composite views - input views vs. comp_text - src_text);
  - green screen: text loss of the edit-over-green's views against "<screen_text> over a green screen";
  - structure: MSE between the self-similarity matrices of the tokens entering CLIP's last
    block (CLS included) for the composite and the input, each resized to short side 224;
  - sparsity of alpha, and early on the relevancy bootstrap of alpha.
The composite, the green-screen image and the input each get their own random views (or one
shared set with shared_clip_views); the views needing gradients go through CLIP in one batch.
Text embeddings are computed once, for every text x template, when the loss is built.
"""

import random

import torch

from losses import terms as losses
from losses.clip_views import STRUCTURE_LONG_MAX, make_views, resize_to, sample_view_params, view_size
from losses.relevancy import bootstrap_maps
from models.tokenizer import tokenize
from util import compositing
from util.config import as_list
from util.crops import random_size_crop
from util.precision import autocast, resolve_precision

# The official prompt templates: a text is embedded in each, and each view draws one at random.
TEXT_TEMPLATES = [
    "photo of {}.", "high quality photo of {}.", "a photo of {}.", "the photo of {}.",
    "image of {}.", "an image of {}.", "high quality image of {}.", "a high quality image of {}.",
    "the {}.", "a {}.", "{}.", "{}", "{}!", "{}...",
]
SCREEN_TEMPLATES = ["{} over a green screen.", "{} in front of a green screen."]
BOOTSTRAP_SIZE = 224


@torch.no_grad()
def encode_texts(clip, texts: list, templates: list, device) -> torch.Tensor:
    """Embeddings of every text in every template: [len(texts), len(templates), E]."""
    prompts = [tpl.format(t) for t in texts for tpl in templates]
    emb = clip.encode_text(tokenize(prompts).to(device))
    return emb.view(len(texts), len(templates), -1).float()


class Text2LiveLoss:
    """Callable: (input image, edit colour, alpha, step) -> (total loss, dict of logged terms)."""

    def __init__(self, clip, cfg: dict, device):
        self.clip, self.cfg, self.device = clip, cfg, device
        self.comp_emb = encode_texts(clip, as_list(cfg["comp_text"]), TEXT_TEMPLATES, device)
        src = as_list(cfg.get("src_text"))
        self.src_emb = encode_texts(clip, src, TEXT_TEMPLATES, device) if src else None
        screen = as_list(cfg.get("screen_text"))
        use_screen = screen and cfg["lambda_screen"] > 0
        self.screen_emb = encode_texts(clip, screen, SCREEN_TEMPLATES, device) if use_screen else None
        boot = as_list(cfg.get("bootstrap_text"))
        self.boot_emb = encode_texts(clip, boot, ["{}"], device)[:, 0] if boot else None
        negative = as_list(cfg.get("bootstrap_negative_text")) if cfg.get("use_negative_bootstrap") else []
        self.negative_emb = encode_texts(clip, negative, ["{}"], device)[:, 0] if negative else None
        self.precision = resolve_precision(cfg.get("mixed_precision", "off"), device)
        self.image_passes = 0  # images through the CLIP image tower, for benchmarks
        clip.visual.official_pos_embed = bool(cfg.get("clip_pos_embed_official", False))

    # -- helpers ------------------------------------------------------------------------
    def bootstrap_weight(self, step: int) -> float:
        cfg = self.cfg
        if self.boot_emb is None or cfg["bootstrap_epoch"] <= 0:
            return 0.0
        return losses.bootstrap_weight(step, cfg["lambda_bootstrap"], cfg["lambda_bootstrap_min"],
                                       cfg["bootstrap_epoch"], cfg["bootstrap_scheduler"])

    @staticmethod
    def _pick(emb, idx_text, idx_tpl):
        return emb[idx_text, idx_tpl]  # [V, E]

    @staticmethod
    def _draw(rng: random.Random, n: int, count: int):
        return torch.tensor([rng.randrange(n) for _ in range(count)])

    def _embed(self, images):
        """CLIP image embeddings [B, E] (under mixed precision if enabled), in float32."""
        self.image_passes += images.shape[0]
        with autocast(self.device, self.precision):
            return self.clip.image_features(images).embedding.float()

    def structure_tokens(self, image):
        """The tokens [1, N, W] entering CLIP's last block (CLS included) for image [1, 3, h, w],
        resized like the official structure loss (short side 224, long side at most 380)."""
        self.image_passes += 1
        x = resize_to(image, view_size(*image.shape[-2:], long_max=STRUCTURE_LONG_MAX))
        with autocast(self.device, self.precision):
            tokens = self.clip.image_features(x, tokens_only=True).tokens
        return tokens.float()

    # -- the loss -----------------------------------------------------------------------
    def __call__(self, image, colour, alpha, step: int, rng: random.Random, torch_gen: torch.Generator,
                 opacity=None):
        """image, colour: [1, 3, h, w]; alpha: [1, 1, h, w]. Returns (total, {term: float}).

        opacity [1, 1, h, w] (a video's foreground layer with multiply_foreground_alpha): the
        composite is seen through it (multiplied by it), the edit over green only where it is
        opaque, and alpha's sparsity and bootstrap apply to alpha * opacity.
        """
        cfg = self.cfg
        V = cfg["n_aug"]
        h, w = image.shape[-2:]
        view_hw = view_size(h, w)
        output = compositing.composite(colour, alpha, image)  # [1, 3, h, w]
        use_dir = self.src_emb is not None
        use_screen = self.screen_emb is not None
        green = compositing.over_green(colour, alpha) if use_screen else None
        if opacity is not None:
            output = opacity * output
            green = compositing.composite(green, opacity, compositing.green_screen(green)) if use_screen else None
            alpha = alpha * opacity

        sources = [output] + ([green] if use_screen else []) + ([image] if use_dir else [])
        if cfg.get("shared_clip_views", False):
            params = sample_view_params(V, (h, w), view_hw, torch_gen)
        else:
            params = [sample_view_params(V, (h, w), view_hw, torch_gen) for _ in sources]
        views = make_views(sources, params, view_hw, fill=cfg["clip_affine_transform_fill"])

        grad_batch = views[:2] if use_screen else views[:1]
        emb = self._embed(torch.cat(grad_batch))
        emb_out = emb[:V]
        if use_dir:
            with torch.no_grad():
                emb_in = self._embed(views[-1])

        k = self._draw(rng, self.comp_emb.shape[0], V)  # text per view
        t = self._draw(rng, len(TEXT_TEMPLATES), V)  # template per view
        terms = {"comp_text": losses.text_loss(emb_out, self._pick(self.comp_emb, k, t), cfg["text_criterion"])}
        if use_dir:  # comp_text and src_text pair by position; the first min(len) pairs count
            kd = self._draw(rng, min(self.comp_emb.shape[0], self.src_emb.shape[0]), V)
            td = self._draw(rng, len(TEXT_TEMPLATES), V)
            terms["comp_dir"] = losses.directional_loss(
                emb_out, emb_in, self._pick(self.comp_emb, kd, td), self._pick(self.src_emb, kd, td),
                normalize=cfg.get("directional_normalize", False))
        if use_screen:
            ks = self._draw(rng, self.screen_emb.shape[0], V)
            ts = self._draw(rng, len(SCREEN_TEMPLATES), V)
            terms["screen"] = losses.text_loss(emb[V:2 * V], self._pick(self.screen_emb, ks, ts), cfg["text_criterion"])
        if cfg["lambda_structure"] > 0:
            with torch.no_grad():
                target_tokens = self.structure_tokens(image)
            # structure_loss takes the self-similarity of each token set once, then the distance
            terms["structure"] = losses.structure_loss(self.structure_tokens(output), target_tokens,
                                                       cfg["structure_loss"])
        terms["sparsity"] = losses.sparsity_loss(alpha, cfg["lambda_alpha_l1"], cfg["lambda_alpha_l0"])

        lambda_boot = self.bootstrap_weight(step)
        if lambda_boot > 0:
            terms["bootstrap"] = self.bootstrap_term(image, alpha, rng)

        weights = {"comp_text": cfg["lambda_composition"], "comp_dir": cfg["lambda_composition"],
                   "screen": cfg["lambda_screen"], "structure": cfg["lambda_structure"],
                   "sparsity": cfg["lambda_sparsity"], "bootstrap": lambda_boot}
        total = sum(weights[name] * value for name, value in terms.items())
        logged = {name: float(value.detach()) for name, value in terms.items()}
        logged["lambda_bootstrap"] = lambda_boot
        return total, logged

    def bootstrap_term(self, image, alpha, rng: random.Random):
        """MSE between alpha and the ROI relevancy map (plus the negative term), on one random
        crop of both (bootstrapping_min_cover) resized to 224x224 with antialiased bilinear."""
        H, W = image.shape[-2:]
        top, left, h, w = random_size_crop(H, W, self.cfg["bootstrapping_min_cover"], rng)
        size = (BOOTSTRAP_SIZE, BOOTSTRAP_SIZE)
        crop = resize_to(image[..., top:top + h, left:left + w], size)
        alpha_crop = resize_to(alpha[..., top:top + h, left:left + w], size)
        negatives = self.negative_emb if self.negative_emb is not None else ()
        self.image_passes += len(self.boot_emb) + len(negatives)
        with autocast(self.device, self.precision):
            positive, negative = bootstrap_maps(self.clip, crop, self.boot_emb, negatives,
                                                self.cfg["relevancy_num_layers"])
        negative = negative.float() if negative is not None else None
        return losses.bootstrap_loss(alpha_crop, positive.float(), negative,
                                     self.cfg["bootstrap_negative_map_threshold"])
