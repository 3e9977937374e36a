"""Incremental detokenization: the router's IncrementalDetokenizer against tokenizers' DecodeStream.

Both turn one generated id at a time into text deltas on the embedded SmolLM2 tokenizer. The bench
times them per token and checks each against the reference, decode(prompt + generated) minus
decode(prompt), on text of several scripts with special tokens mixed in, for prompts that end at
every token boundary of a sentence.

    python3 bench/detokenizers.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from tgis_router.detokenize import IncrementalDetokenizer
from tgis_shard.embedded import DEFAULT_MODEL
from tgis_shard.model_files import default_cache_dir, resolve_model_dir

TEXT = (
    "The lighthouse keeper climbed the spiral stairs at dusk. naïve café déjà vu — crème brûlée. "
    "Emoji in a row 😀😃👍🏽🎉 and a family 👨‍👩‍👧 too. 中文 文本 测试，日本語のテキスト。 "
)
SPECIAL = "<|im_end|>"


class DecodeStreamDetokenizer:
    """DecodeStream behind the IncrementalDetokenizer interface (prompt ids as its context)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(ids=list(prompt_ids), skip_special_tokens=skip_special_tokens)

    def add(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, token_id) or ""


Detokenizer = Callable[[Tokenizer, list[int], bool], object]


def _reference(tokenizer: Tokenizer, prompt: list[int], generated: list[int]) -> str:
    full = tokenizer.decode(prompt + generated, skip_special_tokens=True).rstrip("\ufffd")
    return full[len(tokenizer.decode(prompt, skip_special_tokens=True).rstrip("\ufffd")) :]


def per_token_us(
    make: Detokenizer, tokenizer: Tokenizer, prompt: list[int], generated: list[int], rounds: int
) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        detokenizer = make(tokenizer, prompt, True)
        for token_id in generated:
            detokenizer.add(token_id)  # type: ignore[attr-defined]
    return (time.perf_counter() - started) / (rounds * len(generated)) * 1e6


def mismatches(make: Detokenizer, tokenizer: Tokenizer, ids: list[int], splits: list[int]) -> int:
    """Splits of ``ids`` into prompt and generation whose streamed text differs from the reference."""
    wrong = 0
    for split in splits:
        prompt, generated = ids[:split], ids[split:]
        detokenizer = make(tokenizer, prompt, True)
        text = "".join(detokenizer.add(i) for i in generated)  # type: ignore[attr-defined]
        wrong += text != _reference(tokenizer, prompt, generated)
    return wrong


def _ends_a_character(tokenizer: Tokenizer, ids: list[int]) -> bool:
    """A prompt tokenized from text ends like this; one cut from ids may end inside a character."""
    return not tokenizer.decode(ids, skip_special_tokens=False).endswith("\ufffd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000, help="generated tokens per timed run")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model_dir = resolve_model_dir(DEFAULT_MODEL, None, default_cache_dir())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.encode(TEXT * (args.tokens // 40 + 2), add_special_tokens=False).ids
    prompt, generated = ids[:64], ids[64 : 64 + args.tokens]
    with_specials = tokenizer.encode(TEXT.replace(". ", f". {SPECIAL}"), add_special_tokens=False).ids
    every = list(range(1, len(with_specials)))
    at_characters = [s for s in every if _ends_a_character(tokenizer, with_specials[:s])]
    print(
        "| detokenizer | µs / token | prompts ending a character: texts that differ | any prompt: texts that differ |"
    )
    print("|---|---|---|---|")
    makers = (
        ("IncrementalDetokenizer (tgis_router)", IncrementalDetokenizer),
        ("DecodeStream", DecodeStreamDetokenizer),
    )
    for name, make in makers:
        us = min(per_token_us(make, tokenizer, prompt, generated, args.rounds) for _ in range(3))
        wrong_at_characters = mismatches(make, tokenizer, with_specials, at_characters)
        wrong_anywhere = mismatches(make, tokenizer, with_specials, every)
        print(
            f"| {name} | {us:.2f} | {wrong_at_characters} of {len(at_characters)} | {wrong_anywhere} of {len(every)} |"
        )


if __name__ == "__main__":
    main()
