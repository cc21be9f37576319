"""Embedded corpora (public-domain text) and byte-level tokenization for offline runs.

- ``genesis_exodus``: the books of Genesis and Exodus, King James Version (1611), ~380 KB.
  Used to pre-train the small default model.
- ``psalms``: the book of Psalms, King James Version, ~240 KB. Used as the LoRA adaptation
  domain (poetry rather than narrative).
- ``us_founding``: the Constitution of the United States and the Declaration of Independence,
  ~55 KB. General English prose, the forgetting probe of pre-trained models.

All three are in the public domain; see SOURCES.md beside this file.
"""

from __future__ import annotations

import gzip
from importlib import resources

import torch

CORPORA = {
    "genesis_exodus": "kjv_genesis_exodus.txt.gz",
    "psalms": "kjv_psalms.txt.gz",
    "us_founding": "us_founding.txt.gz",
}

# Byte-level tokens: ids 0..255 are bytes; no special tokens are needed for causal LM training.
VOCAB_SIZE = 256


def load_text(name: str) -> str:
    """The text of an embedded corpus."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; embedded corpora: {sorted(CORPORA)}")
    data = resources.files(__name__).joinpath(CORPORA[name]).read_bytes()
    return gzip.decompress(data).decode("utf-8")


def encode_bytes(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a 1-D int64 tensor of token ids in [0, 256)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode_bytes(ids: torch.Tensor) -> str:
    return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")
