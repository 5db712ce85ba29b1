"""Our CLIP: OpenAI's layout, architecture from shapes, features the method needs."""

import os
import pickle
import random
from pathlib import Path, PurePosixPath

import pytest
import torch

from models.clip import (
    CLIP,
    PRESETS,
    ClipFileError,
    build_model,
    load_clip,
    random_clip,
    read_state_dict,
    resolve_checkpoint,
)
from util.cli import USER_ERRORS
from util.downloads import DownloadError


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
    with pytest.raises(FileNotFoundError, match="for the released model write ViT-B/32"):
        resolve_checkpoint("ViT-B-32.pt")
    with pytest.raises(FileNotFoundError, match="ResNet CLIP models are not supported"):
        resolve_checkpoint("RN50")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ClipFileError, match="is a text file, not a checkpoint"):
        load_clip(str(junk))
    partial = tmp_path / "partial.pt"
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 32, 32)}, partial)
    with pytest.raises(ValueError, match="not a CLIP ViT checkpoint: it lacks the CLIP ViT keys"):
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


# ----------------------------------------------------------------------------------------
# Files that are not CLIP checkpoints: one line saying what the file is, exit status 2


class _RunsCodeWhenUnpickled:
    """Unpickling this (with weights_only=False) would create a folder: a stand-in for malice."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def _small_generator():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.rand(1, 3, 8, 8)).sum().backward()
    optimizer.step()
    return net, optimizer


def make_bad_file(case, folder: Path, good: Path) -> Path:
    """A file of the named kind, made the way users end up with it."""
    path = folder / f"{case}.pt"
    if case == "truncated":  # an interrupted copy of a good checkpoint
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "truncated_legacy":  # the same, in torch's pre-zip format
        legacy = folder / "legacy-full.pt"
        torch.save(torch.load(good, weights_only=True), legacy, _use_new_zipfile_serialization=False)
        data = legacy.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "text":
        path.write_text("model: ViT-B/32\nnotes: weights are on the server\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "git_lfs_pointer":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 351\n")
    elif case == "image_generator":  # what train_image.py writes as model.pt
        net, _ = _small_generator()
        torch.save({"generator": net.state_dict(), "generator_config": {"variant": "official", "skip_n33d": 128},
                    "config": {"comp_text": "cat", "seed": 3}, "step": 1000}, path)
    elif case == "training_checkpoint":  # checkpoints/last.pt of an image run
        net, optimizer = _small_generator()
        torch.save({"step": 20, "lr": 2e-3, "config": {"comp_text": "cat", "seed": 3},
                    "generator_config": {"variant": "official"}, "generator": net.state_dict(),
                    "optimizer": optimizer.state_dict(), "python_rng": random.Random(3).getstate(),
                    "torch_rng": torch.Generator().get_state(), "torch_global_rng": torch.get_rng_state()}, path)
    elif case == "video_edit":  # what train_video.py writes as model.pt
        net, _ = _small_generator()
        torch.save({"generator": net.state_dict(), "generator_config": {"variant": "official"},
                    "layer": "foreground", "config": {"comp_text": "cat"}}, path)
    elif case == "nla":  # this project's NLA checkpoint format
        from models.nla import NLAModel
        torch.save(NLAModel(8, 8, 4).checkpoint(), path)
    elif case == "nla_official":  # the official NLA names, with a non-tensor object as such files can hold
        weights = {"0.weight": torch.zeros(2, 2)}
        torch.save({"model_F_mapping1_state_dict": weights, "model_F_mapping2_state_dict": weights,
                    "F_atlas_state_dict": weights, "model_alpha_state_dict": weights,
                    "iteration": PurePosixPath("checkpoint_20000")}, path)
    elif case == "random_dict":
        torch.save({"epochs": 3, "names": ["a", "b"]}, path)
    elif case == "other_state_dict":
        torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).state_dict(), path)
    elif case == "resnet_clip":
        torch.save({"visual.conv1.weight": torch.zeros(32, 3, 3, 3), "visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
                    "visual.attnpool.positional_embedding": torch.zeros(50, 2048),
                    "token_embedding.weight": torch.zeros(10, 8), "ln_final.weight": torch.zeros(8)}, path)
    elif case == "python_objects":
        torch.save({"weights": torch.zeros(2), "hook": _RunsCodeWhenUnpickled(folder / "code-ran")}, path)
    else:
        raise KeyError(case)
    return path


BAD_FILES = {
    "truncated": "is truncated or corrupt",
    "truncated_legacy": "is truncated or corrupt",
    "text": "is a text file, not a checkpoint",
    "empty": "is an empty file",
    "git_lfs_pointer": "is a Git LFS pointer",
    "image_generator": "it holds a Text2LIVE generator (a model.pt from train_image.py)",
    "training_checkpoint": "it holds a Text2LIVE training checkpoint (checkpoints/last.pt",
    "video_edit": "it holds a Text2LIVE video edit",
    "nla": "it holds a Neural Layered Atlas",
    "nla_official": "it holds a Neural Layered Atlas",
    "random_dict": "it holds a dict of other data",
    "other_state_dict": "it holds the weights of another model",
    "resnet_clip": "ResNet CLIP models are not supported",
    "python_objects": "is not unpickled since that could run code from the file",
}


def _check_one_line(message, path, case):
    assert "\n" not in message and "\r" not in message
    assert BAD_FILES[case] in message
    assert f"clip_model_name={path}" in message
    assert "weights_only" not in message  # never advise loading a file unsafely
    assert ("ResNet" in message) == (case == "resnet_clip")


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_clip_files_fail_in_one_line_saying_what_they_are(case, tmp_path, tiny_clip_file):
    bad = make_bad_file(case, tmp_path, tiny_clip_file)
    with pytest.raises(USER_ERRORS) as e:
        load_clip(str(bad))
    _check_one_line(str(e.value), bad, case)
    if case.startswith("truncated") or case == "empty":
        assert "download it again" in str(e.value)
    elif case not in ("git_lfs_pointer",):
        assert "ViT-B-32.pt" in str(e.value)  # what to pass instead
    assert not (tmp_path / "code-ran").exists()


def test_files_with_python_objects_are_never_unpickled(tmp_path, tiny_clip_file):
    # the premise of the two cases: torch's safe loader refuses them, so they are identified unopened
    for case in ("nla_official", "python_objects"):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(make_bad_file(case, tmp_path, tiny_clip_file), weights_only=True)
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_clip_files_through_the_command_line(case, tmp_path, tiny_clip_file, capsys):
    import train_image
    from util.cli import run_cli

    bad = make_bad_file(case, tmp_path, tiny_clip_file)
    results = tmp_path / "results"
    args = ["--example_config", "chelsea_leopard", f"clip_model_name={bad}", "device=cpu", f"results_folder={results}"]
    with pytest.raises(SystemExit) as e:
        run_cli(train_image.main, args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    _check_one_line(err[0], bad, case)
    assert not results.exists() or not any(results.iterdir())  # no run folder was made
    assert not (tmp_path / "code-ran").exists()


def _offline(monkeypatch):
    """Every URL fails as on a machine without network."""
    import urllib.error

    import util.downloads

    def no_network(*args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(util.downloads.urllib.request, "urlopen", no_network)


def test_a_damaged_cached_download_says_to_delete_it(tmp_path, tiny_clip_file, monkeypatch):
    _offline(monkeypatch)
    monkeypatch.setenv("TEXT2LIVE_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "ViT-B-32.pt"
    cached.parent.mkdir()
    data = tiny_clip_file.read_bytes()
    cached.write_bytes(data[: len(data) // 3])
    with pytest.raises(USER_ERRORS) as e:
        load_clip("ViT-B/32")  # the cache is checked against the released file's sha256
    message = str(e.value)
    assert "\n" not in message and "corrupt or incomplete" in message
    assert f"{cached}" in message and "delete it so it is downloaded again" in message
    with pytest.raises(USER_ERRORS) as e:
        load_clip(str(cached))  # the same file, named by its path
    message = str(e.value)
    assert "\n" not in message and "is truncated or corrupt" in message
    assert f"delete the cached file {cached} so it is downloaded again" in message
    assert cached.read_bytes() == data[: len(data) // 3]  # never deleted or replaced behind the user's back


def test_released_weights_missing_offline_say_where_to_put_them(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    monkeypatch.setenv("TEXT2LIVE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DownloadError) as e:
        load_clip("ViT-B/32")
    message = str(e.value)
    assert "\n" not in message
    assert "Temporary failure in name resolution" in message
    assert f"put ViT-B-32.pt at {tmp_path / 'cache' / 'ViT-B-32.pt'}" in message
    assert "https://openaipublic.azureedge.net/clip/models/" in message
    assert "clip_model_name=/path/to/file.pt" in message
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-made

    import train_image
    from util.cli import run_cli

    results = tmp_path / "results"
    with pytest.raises(SystemExit) as e:
        run_cli(train_image.main, ["--example_config", "chelsea_leopard", "clip_model_name=ViT-B/32",
                                   "device=cpu", f"results_folder={results}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: CLIP ViT-B/32 is not downloaded yet")
    assert not results.exists() or not any(results.iterdir())


def test_weights_put_where_the_message_says_are_used(tmp_path, tiny_clip_file, monkeypatch):
    import hashlib

    import models.clip as clip_module

    _offline(monkeypatch)
    monkeypatch.setenv("TEXT2LIVE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "ViT-B-32.pt").write_bytes(tiny_clip_file.read_bytes())
    digest = hashlib.sha256(tiny_clip_file.read_bytes()).hexdigest()  # stands in for the released file's
    monkeypatch.setitem(clip_module.CLIP_CHECKPOINTS, "ViT-B/32", digest)
    assert load_clip("ViT-B/32").visual.patch_size == 32
