"""Tokenizers that run offline: bytes, the bundled BPE, or any local Hugging Face tokenizer.

Nothing is downloaded: a path must be a `tokenizer.json` (the `tokenizers` library) or a
folder that `transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)` reads
(tokenizer.json, vocab.json + merges.txt, or a SentencePiece tokenizer.model).

The bundled BPE (`bpe`) is a byte-level BPE with 2048 ids trained with `tokenizers` on the
Python standard library's sources (`shoal data tokenizer` trains it again, bit for bit).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shoal.config import ConfigError

BUNDLED_BPE = Path(__file__).with_name("stdlib-bpe-2048.json")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")


class Tokenizer:
    """encode(text) -> ids; `vocab_size` bounds every id; `eos` (or None) ends each document."""

    name: str = "bytes"
    vocab_size: int = 256
    eos: int | None = None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def describe(self) -> dict:
        """What index.json records, so a reader can check the shards match its tokenizer."""
        return {"name": self.name, "vocab_size": self.vocab_size, "eos": self.eos}


class HFTokenizer(Tokenizer):
    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        if path.is_file():
            from tokenizers import Tokenizer as RustTokenizer
            self.fast = RustTokenizer.from_file(str(path))
            self.vocab_size = self.fast.get_vocab_size(with_added_tokens=True)
            self.eos = next((self.fast.token_to_id(t) for t in EOS_CANDIDATES if self.fast.token_to_id(t) is not None),
                            None)
            self._encode = lambda texts: [e.ids for e in self.fast.encode_batch(texts, add_special_tokens=False)]
            self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            from transformers import AutoTokenizer
            try:
                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as err:
                raise ConfigError(f"tokenizer {path}: not a tokenizer.json or transformers tokenizer folder "
                                  f"({str(err).splitlines()[0]})") from None
            self.vocab_size, self.eos = len(tok), tok.eos_token_id
            self._encode = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]
            digest = hashlib.sha256()
            for f in sorted(p for p in path.iterdir() if p.is_file()):
                digest.update(f.name.encode() + f.read_bytes())
            self.sha256 = digest.hexdigest()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encode(texts)

    def describe(self) -> dict:
        return {**super().describe(), "sha256": self.sha256}


def load_tokenizer(spec: str) -> Tokenizer:
    """'bytes', 'bpe' (bundled) or a local path; a missing path is a one-line ConfigError."""
    if spec in ("", "bytes"):
        return Tokenizer()
    if spec == "bpe":
        return HFTokenizer(BUNDLED_BPE, "bpe")
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"tokenizer {spec}: no such file or folder (give 'bytes', 'bpe', a tokenizer.json "
                          f"or a transformers tokenizer folder)")
    if path.is_dir() and (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        path = path / "tokenizer.json"
    return HFTokenizer(path.resolve(), str(path.resolve()))


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Each document's ids followed by the tokenizer's end-of-text id (when it has one)."""
    encoded = tokenizer.encode_batch(texts)
    if tokenizer.eos is not None:
        encoded = [ids + [tokenizer.eos] for ids in encoded]
    return encoded


def train_stdlib_bpe(out: Path, vocab_size: int = 2048, max_bytes: int = 8_000_000) -> Path:
    """Train the bundled byte-level BPE on the standard library's sources (offline, deterministic)."""
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers

    from shoal.data.datasets import stdlib_files
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(max_bytes)]
    tok.train_from_iterator(texts, trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    # compact JSON: the file ships inside the package
    out.write_text(json.dumps(json.loads(tok.to_str()), separators=(",", ":"), ensure_ascii=False))
    return out
