import pytest
import torch

from models.tokenizer import PromptTooLongError, get_tokenizer, tokenize

KNOWN = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "golden horse over a green screen.": [49406, 3878, 4558, 962, 320, 1901, 3750, 269, 49407],
    "Fire out of the bear's mouth!": [49406, 1769, 620, 539, 518, 4298, 568, 4932, 256, 49407],
    "crème brûlée...": [49406, 1075, 12138, 614, 711, 127, 119, 75, 13489, 678, 49407],
    "snowy countryside scene": [49406, 14191, 16303, 3562, 49407],
}


@pytest.mark.parametrize("text, ids", KNOWN.items())
def test_known_ids(text, ids):
    row = tokenize(text)[0]
    assert row[:len(ids)].tolist() == ids
    assert (row[len(ids):] == 0).all()


def test_batch_shape_and_padding():
    out = tokenize(list(KNOWN))
    assert out.shape == (5, 77) and out.dtype == torch.long
    assert (out[:, 0] == 49406).all()
    assert tokenize("snowy countryside scene", context_length=10).shape == (1, 10)


def test_cleanup_whitespace_html_and_case():
    assert torch.equal(tokenize("  A   Photo\tof a\n CAT "), tokenize("a photo of a cat"))
    assert torch.equal(tokenize("cats &amp; dogs"), tokenize("cats & dogs"))


def test_decode_round_trip():
    tok = get_tokenizer()
    assert tok.decode(tok.encode("Golden horse over a green screen.")) == "golden horse over a green screen ."
    assert tok.decode(tok.encode("crème brûlée")) == "crème brûlée"


def test_over_long_text_errors_or_truncates():
    long = "horse " * 100
    with pytest.raises(PromptTooLongError, match="over CLIP's limit of 77"):
        tokenize(long)
    cut = tokenize(long, truncate=True)[0]
    assert cut[-1] == 49407 and cut[0] == 49406 and (cut != 0).all()


def test_the_vocabulary_ships_with_the_project(tmp_path, monkeypatch):
    from models import tokenizer
    from util.downloads import sha256_file
    monkeypatch.setenv("TEXT2LIVE_CACHE", str(tmp_path))  # an empty cache, and no download
    monkeypatch.setattr(tokenizer, "_packaged_vocab", lambda: None)
    monkeypatch.setattr(tokenizer, "fetch_verified", lambda *a, **k: (_ for _ in ()).throw(AssertionError("download")))
    path = tokenizer.find_bpe_vocab()
    assert path == tokenizer.SHIPPED_VOCAB and sha256_file(path) == tokenizer.VOCAB_SHA256
    assert (path.parent / "LICENSE").read_text().startswith("MIT License")
