"""A byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on the corpus, cached."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from corpus import corpus_files, read_text


def cache_dir() -> Path:
    return Path(os.environ.get("CCE_DIST_CACHE", Path.home() / ".cache" / "cce-dist"))


def corpus_key(files: list[Path], vocab_size: int) -> str:
    h = hashlib.sha256(str(vocab_size).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def train_or_load(files: list[Path], texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts`` or load it from the cache."""
    path = cache_dir() / f"tokenizer-{corpus_key(files, vocab_size)}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: a concurrent reader sees all or nothing
    return tok


def corpus_token_ids(paths: list[str], vocab_size: int) -> torch.Tensor:
    """All token ids of the corpus (``paths``, or the default one), as one int64 tensor.

    Under torch.distributed, rank 0 trains (or loads) and caches the tokenizer first and the
    other ranks load the cached file, so it is trained once.
    """
    files = corpus_files(paths)
    texts = read_text(files)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        train_or_load(files, texts, vocab_size)
    if distributed:
        dist.barrier()
    tok = train_or_load(files, texts, vocab_size)
    return torch.tensor([i for enc in tok.encode_batch(texts) for i in enc.ids], dtype=torch.long)
