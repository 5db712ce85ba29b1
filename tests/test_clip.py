"""Our CLIP: OpenAI's layout, architecture from shapes, features the method needs."""

import pytest
import torch

from models.clip import CLIP, PRESETS, build_model, load_clip, random_clip, read_state_dict, resolve_checkpoint


def test_vit_b32_state_dict_loads_with_openai_names_and_shapes(tmp_path):
    model = random_clip("ViT-B/32")
    sd = model.state_dict()
    # a few names and shapes of the released ViT-B/32 file
    assert sd["visual.conv1.weight"].shape == (768, 3, 32, 32)
    assert sd["visual.positional_embedding"].shape == (50, 768)
    assert sd["visual.transformer.resblocks.11.attn.in_proj_weight"].shape == (2304, 768)
    assert sd["transformer.resblocks.11.mlp.c_fc.weight"].shape == (2048, 512)
    assert sd["token_embedding.weight"].shape == (49408, 512)
    assert sd["text_projection"].shape == (512, 512)
    # released files also carry these three scalars; the loader must ignore them
    sd = {k: v.half() for k, v in sd.items()}
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "vit-b-32.pt"
    torch.save(sd, path)
    loaded = load_clip(str(path))
    assert loaded.visual.patch_size == 32 and len(loaded.visual.transformer.resblocks) == 12
    assert loaded.visual.transformer.resblocks[0].attn.heads == 12
    assert loaded.transformer.resblocks[0].attn.heads == 8
    assert all(not p.requires_grad for p in loaded.parameters())
    assert loaded.dtype == torch.float32


def test_other_architectures_are_read_off_the_shapes():
    # a ViT-B/16- and ViT-L/14-like layout, scaled down in depth to stay fast
    for patch, width, grid, text_width in [(16, 768, 14, 512), (14, 1024, 16, 768)]:
        model = CLIP(embed_dim=64, image_resolution=patch * grid, vision_layers=2, vision_width=width,
                     vision_patch_size=patch, context_length=77, vocab_size=49408,
                     transformer_width=text_width, transformer_heads=text_width // 64, transformer_layers=1)
        rebuilt = build_model(model.state_dict())
        assert rebuilt.visual.patch_size == patch
        assert rebuilt.input_resolution == patch * grid
        assert rebuilt.visual.transformer.resblocks[0].attn.heads == width // 64


def test_torchscript_archive_loads_without_python_code(tmp_path, tiny_clip):
    images, tokens = torch.rand(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)
    tokens[0, :3] = torch.tensor([49406, 320, 49407])
    traced = torch.jit.trace(tiny_clip, (images, tokens), check_trace=False)
    path = tmp_path / "tiny-jit.pt"
    traced.save(str(path))
    sd = read_state_dict(path)
    assert set(sd) == set(tiny_clip.state_dict())
    loaded = load_clip(str(path))
    assert torch.allclose(loaded.encode_image(images), tiny_clip.encode_image(images), atol=1e-5)


def test_fp16_file_gives_the_same_model(tiny_clip_file, tiny_clip):
    loaded = load_clip(str(tiny_clip_file))
    x = torch.rand(2, 3, 224, 224)
    assert torch.allclose(loaded.encode_image(x), tiny_clip.half().float().encode_image(x), atol=1e-4)


def test_224_input_is_exactly_the_original_and_other_sizes_work(tiny_clip):
    x = torch.rand(2, 3, 224, 224)
    # reference: the plain ViT forward with the stored position embeddings, written out
    v = tiny_clip.visual
    tokens = v.conv1(tiny_clip.normalize(x)).flatten(2).transpose(1, 2)
    tokens = torch.cat([v.class_embedding.expand(2, 1, -1), tokens], 1) + v.positional_embedding
    h, _ = v.transformer(v.ln_pre(tokens))
    reference = v.ln_post(h[:, 0]) @ v.proj
    assert torch.equal(tiny_clip.encode_image(x), reference)
    for size in [(224, 320), (352, 224), (96, 160)]:
        feats = tiny_clip.image_features(torch.rand(1, 3, *size), return_tokens=True)
        assert feats.embedding.shape == (1, 64)
        assert feats.grid == (size[0] // 32, size[1] // 32)
        assert feats.tokens.shape == (1, 1 + feats.grid[0] * feats.grid[1], 128)  # CLS first


def test_image_features_are_differentiable_wrt_the_image_only(tiny_clip):
    x = torch.rand(1, 3, 224, 288, requires_grad=True)
    feats = tiny_clip.image_features(x, return_tokens=True, keep_probs_from=10)
    assert len(feats.attentions) == 2 and feats.attentions[0].shape == (1, 2, 64, 64)
    assert all(a.requires_grad for a in feats.attentions)
    (feats.embedding.sum() + feats.tokens.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clip.parameters())


def test_explicit_attention_matches_the_fused_kernel(tiny_clip):
    x = torch.rand(2, 3, 224, 224)
    fused = tiny_clip.image_features(x).embedding
    explicit = tiny_clip.image_features(x, keep_probs_from=0).embedding
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_text_encoder_uses_the_end_token(tiny_clip):
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[0, :3] = torch.tensor([49406, 320, 49407])
    tokens[1, :4] = torch.tensor([49406, 320, 1125, 49407])
    emb = tiny_clip.encode_text(tokens)
    assert emb.shape == (2, 64) and not torch.allclose(emb[0], emb[1])


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a released model"):
        resolve_checkpoint(str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read CLIP checkpoint"):
        load_clip(str(junk))
    partial = tmp_path / "partial.pt"
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 32, 32)}, partial)
    with pytest.raises(ValueError, match="not an OpenAI CLIP ViT checkpoint"):
        load_clip(str(partial))


def test_released_names_resolve_through_the_verified_cache(tmp_path, monkeypatch):
    import models.clip as clip_module
    calls = {}

    def fake_fetch(filename, url, sha256, desc=None):
        calls.update(filename=filename, url=url, sha256=sha256)
        return tmp_path / filename

    monkeypatch.setattr(clip_module, "fetch_verified", fake_fetch)
    resolve_checkpoint("ViT-B/32")
    assert calls["filename"] == "ViT-B-32.pt"
    assert calls["sha256"] == "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
    assert calls["sha256"] in calls["url"] and calls["url"].endswith("/ViT-B-32.pt")
    assert PRESETS["ViT-B/32"]["vision_width"] == 768
