"""The model's tokenizer (HF ``tokenizers``), run in a worker pool off the event loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Encoding, Tokenizer


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    raw_length: int  # tokens before truncation


def _keep_last(encoding: Encoding, n: int) -> Tokenized:
    start = max(0, len(encoding.ids) - n) if n else 0
    return Tokenized(encoding.ids[start:], encoding.tokens[start:], encoding.offsets[start:], len(encoding.ids))


class TokenizerPool:
    """Encodes batches of texts in worker threads; the tokenizers library releases the GIL."""

    def __init__(self, tokenizer_file: Path, workers: int):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenizer")
        self._vocab_tokens: dict[int, str] = {}

    async def encode(self, texts: list[str], keep_last: int = 0) -> list[Tokenized]:
        """Adds special tokens; ``keep_last`` > 0 truncates each input to its last n tokens."""
        loop = asyncio.get_running_loop()
        encodings = await loop.run_in_executor(self._pool, self._encode, texts)
        return [_keep_last(e, keep_last) for e in encodings]

    def _encode(self, texts: list[str]) -> list[Encoding]:
        # encode_batch hands even one text to the library's own thread pool: on a few busy cores
        # waking those threads costs far more than encoding a prompt in this one.
        if len(texts) == 1:
            return [self.tokenizer.encode(texts[0], add_special_tokens=True)]
        return self.tokenizer.encode_batch(texts, add_special_tokens=True)

    def id_to_token(self, token_id: int) -> str:
        """The raw vocabulary token ("Ġvery", "▁The"), as TokenInfo.text shows it."""
        token = self._vocab_tokens.get(token_id)
        if token is None:
            token = self.tokenizer.id_to_token(token_id) or ""
            self._vocab_tokens[token_id] = token
        return token

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
