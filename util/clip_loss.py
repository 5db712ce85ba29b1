"""All of Text2LIVE's CLIP losses for one training input, computed with few CLIP passes.

Per input image, one warp makes the same n_aug views of the composite, the green-screen
composite and the input; the CLIP image tower then runs twice:
  - with grad:    composite views + green views + the composite for the structure loss,
  - without grad: input views (directional loss) + the input for the structure loss.
The composite's views serve both the text loss and the directional loss. Text embeddings
are computed once, for every text x template, when the loss is built.
"""

import random

import torch
import torch.nn.functional as F

from datasets.image_dataset import SCREEN_TEMPLATES, TEXT_TEMPLATES, random_crop_box
from models.tokenizer import tokenize
from util import losses
from util.clip_views import make_views, sample_view_params, view_size
from util.config import as_list
from util.precision import autocast, resolve_precision
from util.relevancy import bootstrap_target

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
        self.n_texts = max(e.shape[0] for e in (self.comp_emb, self.src_emb, self.screen_emb) if e is not None)
        self.precision = resolve_precision(cfg.get("mixed_precision", "off"), device)
        self.image_passes = 0  # images through the CLIP image tower, for benchmarks

    # -- helpers ------------------------------------------------------------------------
    def bootstrap_weight(self, step: int) -> float:
        cfg = self.cfg
        if self.boot_emb is None or cfg["bootstrap_epoch"] <= 0:
            return 0.0
        return losses.bootstrap_weight(step, cfg["lambda_bootstrap"], cfg["lambda_bootstrap_min"],
                                       cfg["bootstrap_epoch"], cfg["bootstrap_scheduler"])

    def _pick(self, emb, idx_text, idx_tpl):
        return emb[idx_text % emb.shape[0], idx_tpl]  # [V, E]

    def _encode(self, images, tokens: bool):
        """CLIP image features (under mixed precision if enabled), returned in float32."""
        self.image_passes += images.shape[0]
        with autocast(self.device, self.precision):
            feats = self.clip.image_features(images, return_tokens=tokens)
        feats.embedding = feats.embedding.float()
        feats.tokens = feats.tokens.float() if feats.tokens is not None else None
        return feats

    # -- the loss -----------------------------------------------------------------------
    def __call__(self, image, colour, alpha, step: int, rng: random.Random, generator: torch.Generator):
        """image, colour: [1, 3, h, w]; alpha: [1, 1, h, w]. Returns (total, {term: float})."""
        cfg = self.cfg
        V = cfg["n_aug"]
        h, w = image.shape[-2:]
        view_hw = view_size(h, w)
        output = losses.composite(colour, alpha, image)  # [1, 3, h, w]
        use_dir = self.src_emb is not None
        use_screen = self.screen_emb is not None

        params = sample_view_params(V, (h, w), view_hw, generator)
        sources = [output] + ([losses.over_green(colour, alpha)] if use_screen else []) + ([image] if use_dir else [])
        views = make_views(sources, params, view_hw, fill=cfg["clip_affine_transform_fill"])
        out_views = views[0]
        green_views = views[1] if use_screen else None
        in_views = views[-1].detach() if use_dir else None

        need_structure = cfg["lambda_structure"] > 0
        resize = lambda x: F.interpolate(x, size=view_hw, mode="bilinear", align_corners=False, antialias=True)
        grad_batch = [out_views] + ([green_views] if use_screen else []) + ([resize(output)] if need_structure else [])
        feats = self._encode(torch.cat(grad_batch), tokens=need_structure)
        emb_out = feats.embedding[:V]

        nograd_batch = ([in_views] if use_dir else []) + ([resize(image)] if need_structure else [])
        feats_in = None
        if nograd_batch:
            with torch.no_grad():
                feats_in = self._encode(torch.cat(nograd_batch), tokens=need_structure)

        k = torch.tensor([rng.randrange(self.n_texts) for _ in range(V)])  # text (pairs) per view
        t = torch.tensor([rng.randrange(len(TEXT_TEMPLATES)) for _ in range(V)])  # template per view
        target = self._pick(self.comp_emb, k, t)
        terms = {"comp_text": losses.text_loss(emb_out, target, cfg["text_criterion"])}
        if use_dir:
            emb_in = feats_in.embedding[:V]
            terms["comp_dir"] = losses.directional_loss(emb_out, emb_in, target, self._pick(self.src_emb, k, t))
        if use_screen:
            ts = torch.tensor([rng.randrange(len(SCREEN_TEMPLATES)) for _ in range(V)])
            emb_green = feats.embedding[V:2 * V]
            terms["screen"] = losses.text_loss(emb_green, self._pick(self.screen_emb, k, ts), cfg["text_criterion"])
        if need_structure:
            terms["structure"] = losses.structure_loss(feats.tokens[-1:], feats_in.tokens[-1:], cfg["structure_loss"])
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
        """MSE between alpha and the ROI relevancy map, on a random crop at 224x224."""
        H, W = image.shape[-2:]
        top, left, h, w = random_crop_box(H, W, self.cfg["bootstrapping_min_cover"], rng)
        size = (BOOTSTRAP_SIZE, BOOTSTRAP_SIZE)
        crop = F.interpolate(image[..., top:top + h, left:left + w], size=size, mode="bilinear",
                             align_corners=False, antialias=True)
        alpha_crop = F.interpolate(alpha[..., top:top + h, left:left + w], size=size, mode="bilinear",
                                   align_corners=False)
        negatives = self.negative_emb if self.negative_emb is not None else ()
        self.image_passes += len(self.boot_emb) + len(negatives)
        with autocast(self.device, self.precision):
            target = bootstrap_target(self.clip, crop, self.boot_emb, negatives, self.cfg["relevancy_num_layers"],
                                      self.cfg["bootstrap_negative_map_threshold"]).float()
        return losses.bootstrap_loss(alpha_crop, target)
