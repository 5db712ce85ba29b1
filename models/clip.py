"""CLIP (Radford et al. 2021): a ViT image tower and a text transformer.

Parameter names and shapes follow OpenAI's released checkpoints, so their files load
unchanged; the architecture is read off the tensor shapes (ViT-B/32, ViT-B/16, ViT-L/14).
Beyond the usual embeddings, the image tower can return what Text2LIVE needs, all
differentiable w.r.t. the input image:
  - the tokens entering the last block, CLS included (structure loss, self-similarity),
  - per-block attention probabilities that keep their graph (relevancy maps),
  - any input size and aspect ratio, by bicubic interpolation of the position embeddings.
"""

import io
import math
import os
import pickle
import pickletools
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.downloads import cache_dir, fetch_verified
from util.errors import ClipFileError, DownloadError  # noqa: F401  (raised here)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Released ViT checkpoints: the SHA-256 of each file is part of its public URL.
_URL_ROOT = "https://openaipublic.azureedge.net/clip/models"
CLIP_CHECKPOINTS = {
    "ViT-B/32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B/16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L/14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
}


def checkpoint_url(name: str) -> str:
    filename = name.replace("/", "-") + ".pt"
    return f"{_URL_ROOT}/{CLIP_CHECKPOINTS[name]}/{filename}"


# ----------------------------------------------------------------------------------------
# Building blocks


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as the released models)."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), written as one fused SiLU: silu(1.702 x) / 1.702."""

    def forward(self, x):
        return F.silu(1.702 * x) / 1.702


class MultiheadSelfAttention(nn.Module):
    """Self-attention with OpenAI's parameter names (in_proj_*, out_proj).

    With keep_probs=True the softmax probabilities are computed explicitly and returned,
    still attached to the graph, so a relevancy map can take gradients w.r.t. them.
    Otherwise the fused kernel is used.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal: bool = False, keep_probs: bool = False):
        B, N, W = x.shape  # [B, N, W]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, N, 3W]
        qkv = qkv.view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [B, h, N, d]
        probs = None
        if keep_probs:
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)  # [B, h, N, N]
            if causal:
                mask = torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(mask, float("-inf"))
            probs = scores.softmax(dim=-1)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = out.transpose(1, 2).reshape(B, N, W)
        return self.out_proj(out), probs


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x, causal: bool = False, keep_probs: bool = False):
        attn_out, probs = self.attn(self.ln_1(x), causal=causal, keep_probs=keep_probs)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, probs


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, causal: bool = False, keep_probs_from: int | None = None, n_blocks: int | None = None):
        """x: [B, N, W]. Attention probabilities are kept for blocks index >= keep_probs_from.
        n_blocks: run only the first n_blocks blocks (default: all)."""
        all_probs = []
        for i, block in enumerate(self.resblocks[:n_blocks]):
            keep = keep_probs_from is not None and i >= keep_probs_from
            x, probs = block(x, causal=causal, keep_probs=keep)
            if keep:
                all_probs.append(probs)
        return x, all_probs


# ----------------------------------------------------------------------------------------
# Image tower


@dataclass
class ImageFeatures:
    embedding: torch.Tensor | None = None  # [B, E] projected CLS embedding (not normalised)
    tokens: torch.Tensor | None = None  # [B, 1+gh*gw, W] tokens entering the last block, CLS first
    grid: tuple[int, int] | None = None  # (gh, gw) patch grid of the tokens
    attentions: list | None = None  # per kept block: [B, heads, 1+gh*gw, 1+gh*gw]


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int,
                 heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        # True reproduces the official Text2LIVE interpolation, which swaps the grid's height and
        # width for non-square inputs (config clip_pos_embed_official); False is the correct one.
        self.official_pos_embed = False

    def position_embedding_for(self, gh: int, gw: int):
        """Position embeddings for a gh x gw patch grid: [1 + gh*gw, W].

        The stored grid is returned untouched, so a 224x224 input gives exactly the
        original model's result; other grids use bicubic interpolation.
        """
        pos = self.positional_embedding
        g = int(round(math.sqrt(pos.shape[0] - 1)))
        if (gh, gw) == (g, g):
            return pos
        cls_pos, patch_pos = pos[:1], pos[1:]
        if self.official_pos_embed:
            return torch.cat([cls_pos, self._swapped_patch_positions(patch_pos, g, gh, gw)], dim=0)
        patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, W, g, g]
        patch_pos = F.interpolate(patch_pos.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(gh * gw, -1)
        return torch.cat([cls_pos, patch_pos], dim=0)

    @staticmethod
    def _swapped_patch_positions(patch_pos, g: int, gh: int, gw: int):
        """The official code's interpolation: the g x g grid is resized by scale factors
        ((gw + 0.1) / g, (gh + 0.1) / g) to gw rows and gh columns, then read row by row as if it
        were gh rows of gw tokens. [g*g, W] -> [gh*gw, W]."""
        grid = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # [1, W, g, g]
        grid = F.interpolate(grid, scale_factor=((gw + 0.1) / g, (gh + 0.1) / g), mode="bicubic",
                             align_corners=False)  # [1, W, gw, gh]
        return grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(gh * gw, -1)

    def forward(self, x, return_tokens: bool = False, keep_probs_from: int | None = None,
                tokens_only: bool = False) -> ImageFeatures:
        """x: normalised images [B, 3, H, W], any H, W >= patch size.

        return_tokens: also return the tokens entering the last block (the structure loss's
        tokens, CLS included); tokens_only: return just those, without running the last block."""
        x = self.conv1(x.to(self.conv1.weight.dtype))  # [B, W, gh, gw]
        B, W, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, W]
        cls = self.class_embedding.to(x.dtype).expand(B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.position_embedding_for(gh, gw).to(x.dtype)
        x = self.ln_pre(x)
        last = len(self.transformer.resblocks) - 1
        x, probs = self.transformer(x, keep_probs_from=keep_probs_from, n_blocks=last)  # [B, 1+gh*gw, W]
        tokens = x if return_tokens or tokens_only else None
        if tokens_only:
            return ImageFeatures(tokens=tokens, grid=(gh, gw))
        x, last_probs = self.transformer.resblocks[last](x, keep_probs=keep_probs_from is not None
                                                         and last >= keep_probs_from)
        if last_probs is not None:
            probs.append(last_probs)
        embedding = self.ln_post(x[:, 0]) @ self.proj  # [B, E]
        return ImageFeatures(
            embedding=embedding,
            tokens=tokens,
            grid=(gh, gw),
            attentions=probs if keep_probs_from is not None else None,
        )


# ----------------------------------------------------------------------------------------
# CLIP


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int, vision_width: int,
                 vision_patch_size: int, context_length: int, vocab_size: int,
                 transformer_width: int, transformer_heads: int, transformer_layers: int):
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(
            input_resolution=image_resolution, patch_size=vision_patch_size, width=vision_width,
            layers=vision_layers, heads=max(1, vision_width // 64), output_dim=embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self):
        """Random initialisation in the spirit of the original (used for tests and benchmarks)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, self.visual.transformer):
            w = tower.width
            proj_std = (w ** -0.5) * ((2 * len(tower.resblocks)) ** -0.5)
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=w ** -0.5)
                nn.init.zeros_(block.attn.in_proj_bias)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * w) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    @property
    def input_resolution(self) -> int:
        return self.visual.input_resolution

    @staticmethod
    def normalize(images):
        """Pixel images in [0, 1], [B, 3, H, W] -> CLIP's normalised input."""
        mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    def image_features(self, images, return_tokens=False, keep_probs_from=None, tokens_only=False) -> ImageFeatures:
        """images: pixel values in [0, 1], [B, 3, H, W]."""
        return self.visual(self.normalize(images), return_tokens=return_tokens,
                           keep_probs_from=keep_probs_from, tokens_only=tokens_only)

    def encode_image(self, images):
        """images: pixel values in [0, 1], [B, 3, H, W] -> [B, E]."""
        return self.image_features(images).embedding

    def encode_text(self, tokens):
        """tokens: [B, context_length] ids from models.tokenizer.tokenize -> [B, E]."""
        x = self.token_embedding(tokens).to(self.dtype) + self.positional_embedding.to(self.dtype)
        x, _ = self.transformer(x, causal=True)
        x = self.ln_final(x)
        eot = tokens.argmax(dim=-1)  # the end token has the largest id
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(self, images, tokens):
        """Image-text logits [B_img, B_txt] (images in [0, 1])."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        return self.logit_scale.exp() * img @ txt.t()


# ----------------------------------------------------------------------------------------
# Building from a state dict and loading files

PRESETS = {
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=32, context_length=77, vocab_size=49408,
                     transformer_width=512, transformer_heads=8, transformer_layers=12),
    # A tiny model of the same class for tests: same patch size, token layout and vocabulary.
    "tiny": dict(embed_dim=64, image_resolution=224, vision_layers=12, vision_width=128,
                 vision_patch_size=32, context_length=77, vocab_size=49408,
                 transformer_width=64, transformer_heads=1, transformer_layers=2),
}


def random_clip(preset: str = "ViT-B/32", seed: int = 0) -> CLIP:
    """A randomly initialised CLIP of a known shape (tests and benchmarks; no download)."""
    torch.manual_seed(seed)
    return CLIP(**PRESETS[preset])




USE_VIT = "set clip_model_name=ViT-B/32 (downloaded once) or to the path of OpenAI's ViT-B-32.pt"

# The keys every OpenAI CLIP ViT state dict has (ResNet CLIP models have no visual.conv1 etc.)
_CLIP_VIT_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
                  "positional_embedding", "token_embedding.weight", "ln_final.weight")
# Scalars the released files carry next to the weights
_CLIP_SCALARS = ("input_resolution", "context_length", "vocab_size")
# Top-level keys of Neural Layered Atlas checkpoints (the official names and this project's)
_NLA_KEYS = ("model_F_mapping1_state_dict", "model_F_mapping2_state_dict", "F_atlas_state_dict",
             "model_F_alpha_state_dict", "model_alpha_state_dict")
_ZIP_MAGIC = b"PK\x03\x04"


def _one_line(text, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _some_keys(keys, n: int = 3) -> str:
    keys = [str(k) for k in keys]
    shown = ", ".join(repr(_one_line(k, 60)) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _known_other_checkpoint(keys) -> str | None:
    """What a checkpoint with these top-level keys is, when it is a known kind that is not a CLIP ViT."""
    keys = {str(k) for k in keys}
    if "generator" in keys and keys & {"generator_config", "optimizer", "step", "config", "layer"}:
        if "optimizer" in keys:
            return "a Text2LIVE training checkpoint (checkpoints/last.pt of a train_image.py run)"
        if "layer" in keys:
            return "a Text2LIVE video edit (a model.pt from train_video.py)"
        return "a Text2LIVE generator (a model.pt from train_image.py)"
    if keys & set(_NLA_KEYS) or "atlas_backend" in keys:
        return ("a Neural Layered Atlas (a train_nla.py or pretrained_nla_models/ checkpoint, "
                "which a video config takes as checkpoint_path)")
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in keys):
        return "a ResNet CLIP; ResNet CLIP models are not supported, use a ViT model"
    if any(k.startswith("vision_model.") for k in keys) and any(k.startswith("text_model.") for k in keys):
        return "a Hugging Face transformers CLIP, whose parameter names are not OpenAI's"
    return None


def _why_not_clip(obj) -> str | None:
    """None when obj looks like an OpenAI CLIP ViT state dict, else why it is not one."""
    if not isinstance(obj, dict):
        return f"it holds a {type(obj).__name__}, not a state dict"
    if not obj:
        return "it holds an empty dict"
    known = _known_other_checkpoint(obj)
    if known is not None:
        return f"it holds {known}"
    missing = [k for k in _CLIP_VIT_KEYS if k not in obj]
    if not missing:
        odd = [k for k, v in obj.items() if not torch.is_tensor(v) and k not in _CLIP_SCALARS]
        if odd:
            return f"its entry {_some_keys(odd, 1)} is a {type(obj[odd[0]]).__name__}, not a tensor"
        return None
    if len(missing) < len(_CLIP_VIT_KEYS):
        return f"it lacks the CLIP ViT keys {_some_keys(missing)}"
    if all(torch.is_tensor(v) for v in obj.values()):
        return f"it holds the weights of another model ({len(obj)} tensors: {_some_keys(list(obj))})"
    return f"it holds a dict of other data (keys {_some_keys(list(obj))})"


def _unwrap(obj):
    """The state dict inside common wrappers ({'state_dict': ...}, {'model': ...}, 'module.' names)."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _count_blocks(state_dict, prefix):
    return len({k.split(".")[len(prefix.split("."))] for k in state_dict
                if k.startswith(prefix) and k.endswith(".attn.in_proj_weight")})


def build_model(state_dict: dict, source: str = "the checkpoint") -> CLIP:
    """Build a CLIP whose architecture is read off the tensor shapes, and load the weights.

    Anything that is not an OpenAI CLIP ViT state dict raises ClipFileError naming `source`.
    """
    problem = _why_not_clip(state_dict)
    if problem is not None:
        raise ClipFileError(f"{source} is not a CLIP ViT checkpoint: {problem}; {USE_VIT}")
    weights = {k: v for k, v in state_dict.items() if k not in _CLIP_SCALARS}
    try:
        conv = state_dict["visual.conv1.weight"]
        vision_width, patch = conv.shape[0], conv.shape[-1]
        grid = int(round(math.sqrt(state_dict["visual.positional_embedding"].shape[0] - 1)))
        transformer_width = state_dict["ln_final.weight"].shape[0]
        model = CLIP(
            embed_dim=state_dict["text_projection"].shape[1],
            image_resolution=patch * grid,
            vision_layers=_count_blocks(state_dict, "visual.transformer.resblocks"),
            vision_width=vision_width,
            vision_patch_size=patch,
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            transformer_width=transformer_width,
            transformer_heads=max(1, transformer_width // 64),
            transformer_layers=_count_blocks(state_dict, "transformer.resblocks"),
        )
    except (IndexError, RuntimeError, ValueError, TypeError, ZeroDivisionError) as e:
        raise ClipFileError(f"{source} does not fit a CLIP ViT (its tensor shapes give no valid architecture: "
                            f"{type(e).__name__}); {USE_VIT}") from e
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshaped = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        parts = [f"{label} {_some_keys(keys, 2)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if keys]
        raise ClipFileError(f"{source} does not fit a CLIP ViT ({', '.join(parts)}): a modified CLIP or "
                            f"another model; {USE_VIT}")
    model.load_state_dict(weights, strict=True)
    return model


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def _fetch_again(path: Path) -> str:
    """How to get a good copy of a damaged file: a cached download is deleted and fetched anew."""
    try:
        cached = path.resolve().parent == cache_dir().resolve()
    except OSError:
        cached = False
    if cached:
        return f"delete the cached file {path} so it is downloaded again"
    return f"download it again, or {USE_VIT}"


def _text_file(head: bytes) -> str | None:
    """What a file that starts with `head` is and what to do, if it is text (None for binary files)."""
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut off at the end of the head
            return None
        text = head[:e.start].decode("utf-8")
    start = text.lstrip().lower()
    if start.startswith("version https://git-lfs"):
        return ("a Git LFS pointer (a small text file standing in for the weights), not a checkpoint; "
                "run `git lfs pull` or download the file itself")
    if start.startswith(("<!doctype html", "<html")):
        return f"an HTML page, not a checkpoint (a failed download?); download the file again, or {USE_VIT}"
    first = next((line for line in text.splitlines() if line.strip()), "")
    return f"a text file, not a checkpoint (it begins {_one_line(first, 40)!r}); {USE_VIT}"


def _pickled_strings(path: Path, limit: int = 64 << 20) -> set:
    """The strings in a checkpoint's pickles, found by parsing the opcodes: nothing is unpickled,
    so no code from the file runs. Best effort: a damaged file gives what was read before."""
    found = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                infos = [i for i in archive.infolist() if i.filename.endswith("data.pkl") and i.file_size <= limit]
                data = archive.read(infos[0]) if infos else b""
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
        stream = io.BytesIO(data)
        for _ in range(4):  # the legacy format: magic number, protocol, system info, the object
            if stream.tell() >= len(data):
                break
            for _opcode, arg, _pos in pickletools.genops(stream):
                if isinstance(arg, str):
                    found.add(arg)
    except Exception:  # a damaged pickle: keep what was found
        pass
    return found


def _load_failure(e: Exception) -> str:
    """torch's reason for not reading a file, in a few words and never its unsafe-loading advice."""
    first = _one_line(str(e).strip().splitlines()[0] if str(e).strip() else "", 100)
    if not first or "weights_only" in first or "weights only" in first.lower():
        return type(e).__name__
    return f"{type(e).__name__}: {first}"


def read_state_dict(path, source: str | None = None) -> dict:
    """State dict from a TorchScript archive (as OpenAI ships) or a plain torch.save file.

    Plain files are unpickled with weights_only=True: only tensors and plain containers, no
    code from the file. Anything else raises ClipFileError with one line naming `source`
    (default: the path), what the file is and what to do.
    """
    path = Path(path)
    source = source or str(path)
    again = _fetch_again(path)
    if path.is_dir():
        raise ClipFileError(f"{source} is a folder, not a checkpoint file; {USE_VIT}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise ClipFileError(f"{source} cannot be read ({_one_line(e.strerror or e, 80)}); "
                            "check that it is a readable file") from e
    if size == 0:
        raise ClipFileError(f"{source} is an empty file (0 bytes), not a checkpoint; {again}")

    torchscript = False
    if head.startswith(_ZIP_MAGIC) or zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            raise ClipFileError(f"{source} is truncated or corrupt (a zip archive without its end, "
                                f"{size} bytes); {again}") from None
        torchscript = any("/code/" in name or name.startswith("code/") for name in names)
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise ClipFileError(f"{source} is a zip archive but not a PyTorch checkpoint (no data.pkl inside); "
                                f"{USE_VIT}")
    elif head[:1] != b"\x80":  # neither a zip archive nor a binary pickle (torch's legacy format)
        text = _text_file(head)
        if text is not None:
            raise ClipFileError(f"{source} is {text}")
        raise ClipFileError(f"{source} is not a PyTorch checkpoint (neither a zip archive nor a pickle); {USE_VIT}")

    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles: the error below says it all
            warnings.simplefilter("ignore")
            if torchscript:
                state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
            else:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise ClipFileError(f"{source} is truncated or corrupt ({_load_failure(e)}); {again}") from None
        # Python objects besides tensors: never unpickled (that could run code from the file).
        known = _known_other_checkpoint(_pickled_strings(path))
        if known is not None:
            raise ClipFileError(f"{source} is not a CLIP ViT checkpoint: it holds {known}; {USE_VIT}") from None
        raise ClipFileError(f"{source} is not a CLIP ViT checkpoint: it holds pickled Python objects, not only "
                            "tensors, and is not unpickled since that could run code from the file; "
                            f"{USE_VIT}") from None
    except Exception as e:  # any failure to read: a damaged or foreign file
        if "invalid magic number" in str(e).lower():
            raise ClipFileError(f"{source} is a Python pickle but not a PyTorch checkpoint; {USE_VIT}") from None
        raise ClipFileError(f"{source} is truncated or corrupt ({_load_failure(e)}); {again}") from e
    state_dict = _unwrap(state_dict)
    if not isinstance(state_dict, dict):
        raise ClipFileError(f"{source} is not a CLIP ViT checkpoint: it holds a {type(state_dict).__name__}, "
                            f"not a state dict; {USE_VIT}")
    return dict(state_dict)


def resolve_checkpoint(name_or_path: str) -> Path:
    """A released name ("ViT-B/32") -> cached/downloaded file; anything else must be a file."""
    names = ", ".join(CLIP_CHECKPOINTS)
    if name_or_path in CLIP_CHECKPOINTS:
        filename = name_or_path.replace("/", "-") + ".pt"
        url = checkpoint_url(name_or_path)
        target = cache_dir() / filename
        try:
            return fetch_verified(filename, url, CLIP_CHECKPOINTS[name_or_path], desc=f"CLIP {name_or_path}")
        except DownloadError as e:
            if target.exists():  # a cached copy that fails its checksum: that message says to delete it
                raise
            reason = _one_line(getattr(e, "reason", None) or e, 120)
            raise DownloadError(
                f"CLIP {name_or_path} is not downloaded yet and could not be fetched ({reason}); download {url} "
                f"on another machine and put {filename} at {target} (the folder is $TEXT2LIVE_CACHE when set), "
                "or set clip_model_name=/path/to/file.pt to use any local CLIP ViT checkpoint") from e
    path = Path(os.path.expanduser(name_or_path))
    if path.is_file():
        return path
    if path.is_dir():
        raise FileNotFoundError(f"clip_model_name={name_or_path} is a folder; give the checkpoint file in it "
                                f"(e.g. ViT-B-32.pt) or a released model ({names})")
    if name_or_path.upper().startswith("RN") and "/" not in name_or_path and "." not in name_or_path:
        raise FileNotFoundError(f"clip_model_name={name_or_path}: ResNet CLIP models are not supported; "
                                f"use a ViT model ({names}) or the path of its .pt file")
    hint = next((f" (for the released model write {name})" for name in CLIP_CHECKPOINTS
                 if name_or_path in (name.replace("/", "-"), name.replace("/", "-") + ".pt")), "")
    raise FileNotFoundError(f"clip_model_name '{name_or_path}' is neither a released model ({names}) "
                            f"nor an existing file; fix clip_model_name{hint}")


def load_clip(name_or_path: str = "ViT-B/32", device="cpu", setting: str = "clip_model_name") -> CLIP:
    """A frozen CLIP in eval mode, float32, on `device`. setting: what the user set to choose
    it (the config key clip_model_name, or a command line's flag such as --clip), as the error
    messages name it."""
    try:
        path = resolve_checkpoint(name_or_path)
        if name_or_path in CLIP_CHECKPOINTS:
            source = f"the cached CLIP {name_or_path} file {path}"
        else:
            source = f"clip_model_name={name_or_path}"
        model = build_model(read_state_dict(path, source), source)
    except (DownloadError, FileNotFoundError) as e:
        if setting == "clip_model_name":
            raise
        raise _named_as(e, setting) from None
    model = model.float().eval().requires_grad_(False)
    return model.to(device)


def _named_as(error: Exception, setting: str) -> Exception:
    """The same error with clip_model_name in its message written as `setting` (e.g. --clip)."""
    message = str(error).replace("clip_model_name=", f"{setting} ").replace("clip_model_name", setting)
    if isinstance(error, DownloadError):
        return type(error)(message, reason=error.reason)
    return type(error)(message)


__all__ = ["CLIP", "ImageFeatures", "load_clip", "build_model", "read_state_dict", "random_clip",
           "resolve_checkpoint", "checkpoint_url", "CLIP_MEAN", "CLIP_STD", "DownloadError", "ClipFileError"]
