"""CLIP's byte-level BPE tokenizer, reimplemented to give exactly OpenAI's token ids.

The vocabulary file (bpe_simple_vocab_16e6.txt.gz, MIT-licensed data from OpenAI's CLIP) ships
in models/vocab/; should that copy be missing or damaged, the one in the cache
($TEXT2LIVE_CACHE), in an installed package that ships it (clip-anytorch), or a download,
checksum-verified, is used instead.
"""

import gzip
import html
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

from util.downloads import cache_dir, fetch_verified, sha256_file
from util.errors import DownloadError, PromptTooLongError  # noqa: F401  (raised here)

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
VOCAB_URL = "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz"
START, END = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77



_PIECES = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                        regex.IGNORECASE)


def _packaged_vocab():
    """The vocabulary inside an installed package (found without importing it)."""
    for package in ("clip", "open_clip"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        folders = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
        for folder in folders:
            path = Path(folder) / VOCAB_NAME
            if path.is_file() and sha256_file(path) == VOCAB_SHA256:
                return path
    return None


SHIPPED_VOCAB = Path(__file__).resolve().parent / "vocab" / VOCAB_NAME


def find_bpe_vocab() -> Path:
    """The shipped copy -> cache -> installed package -> verified download."""
    if SHIPPED_VOCAB.is_file() and sha256_file(SHIPPED_VOCAB) == VOCAB_SHA256:
        return SHIPPED_VOCAB
    cached = cache_dir() / VOCAB_NAME
    if cached.exists():
        return fetch_verified(VOCAB_NAME, VOCAB_URL, VOCAB_SHA256)  # verifies the cached copy
    packaged = _packaged_vocab()
    if packaged is not None:
        return packaged
    try:
        return fetch_verified(VOCAB_NAME, VOCAB_URL, VOCAB_SHA256, desc="CLIP vocabulary")
    except DownloadError as e:
        raise DownloadError(f"CLIP's BPE vocabulary is missing ({e}); restore {SHIPPED_VOCAB} "
                            f"(git checkout models/vocab) or place {VOCAB_NAME} at {cached}") from e


def _bytes_to_unicode() -> dict:
    """Map every byte to a printable character. Printable latin-1 bytes map to themselves and
    come first (this order is the order of the vocabulary), then the rest as chr(256 + n)."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in kept}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def _clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class SimpleTokenizer:
    def __init__(self, vocab_path=None):
        vocab_path = vocab_path or find_bpe_vocab()
        lines = gzip.open(vocab_path, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.cache = {START: START, END: END}
        self.start_id, self.end_id = self.encoder[START], self.encoder[END]

    def bpe(self, piece: str) -> str:
        """Space-separated BPE symbols of one pre-token (characters already byte-mapped)."""
        if piece in self.cache:
            return self.cache[piece]
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        self.cache[piece] = out
        return out

    def encode(self, text: str) -> list:
        ids = []
        for piece in _PIECES.findall(_clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(mapped).split(" "))
        return ids

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        words = text.split("</w>")
        return " ".join(bytearray(self.byte_decoder[c] for c in w).decode("utf-8", errors="replace")
                        for w in words).strip()


@lru_cache(maxsize=1)
def get_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(texts, context_length: int = CONTEXT_LENGTH, truncate: bool = False) -> torch.Tensor:
    """Token ids [N, context_length]: start, text, end, zero padding.

    Text longer than the context is an error naming it, unless truncate=True (then it is
    cut and the end token kept in the last position).
    """
    tok = get_tokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tok.start_id] + tok.encode(text) + [tok.end_id]
        if len(ids) > context_length:
            if not truncate:
                short = text if len(text) <= 40 else text[:37] + "..."
                raise PromptTooLongError(f"text '{short}' is {len(ids)} tokens long, over CLIP's limit of "
                                 f"{context_length}; use a shorter prompt")
            ids = ids[:context_length - 1] + [tok.end_id]
        out[row, :len(ids)] = torch.tensor(ids)
    return out
