"""Tests for :mod:`tgis_router.detokenize`.

Two small tokenizers are trained here with ``tokenizers`` so that the tests do
not depend on any downloaded file:

* a GPT-2 style byte-level BPE, whose tokens may hold parts of a UTF-8
  character (even "space + first bytes of an emoji");
* a Llama/SentencePiece style BPE with a Metaspace "▁" pre-tokenizer and a
  ``Replace / ByteFallback / Fuse / Strip`` decoder, whose alphabet leaves out
  emoji and most CJK so that those are spelled with ``<0xNN>`` byte tokens.

A real tokenizer (SmolLM2, byte-level) is used too when it is available.

The reference for "the generated text" is, throughout::

    decode(prompt + generated) minus decode(prompt)

where both decodes leave out an incomplete character at their end (see
``decodable_text``): it is never emitted, and when the prompt is cut inside a
character the generation completes that character. The brief's variant that decodes only the last 5 prompt ids agrees
whenever those ids start on a character boundary (checked below); when they do
not, the short window decodes a byte-fallback run differently and the variant
is wrong (see ``test_generation_continuing_a_byte_run_of_the_prompt``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import cast

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tgis_router.detokenize import (
    MAX_WINDOW_TOKENS,
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
)

TRAINING_CORPUS = [
    "The capital of France is Paris.",
    "Paris is the capital and the largest city of France.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello again and again.",
    "I love streaming text one token at a time.",
    "naïve café déjà vu, café crème",
    "Emoji are fun 😀 😃 🎉 👍🏽 😀",
    "中文 文本 中文 中国 中文",
    "日本語のテキスト",
]

#: Texts whose tokenizations provide the generated sequences. They mix words
#: split over several tokens, accents, emoji (incl. modifiers and ZWJ
#: sequences), CJK, whitespace runs and characters missing from the trained
#: alphabets (so byte tokens occur).
TEXTS = [
    "The capital of France is Paris.",
    "Hello world! 😀 🎉 Hello again.",
    "中文 文本 测试 中文，日本語のテキスト。",
    "naïve café déjà vu — crème brûlée",
    "Emoji in a row 😀😃👍🏽🎉 and a family 👨‍👩‍👧 too",
    "  leading and   multiple   spaces\nnew line\n\ttab",
    "numbers 12345 and symbols #@$%^&*() ~",
    "unbelievably incomprehensible",
    "末尾の絵文字😀",
    "😀😀😀",
]


# --------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------


def _train_metaspace_tokenizer() -> Tokenizer:
    """Llama-like BPE: Metaspace "▁", byte fallback, first space stripped."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    # Keep emoji and most CJK out of the alphabet so they need byte fallback.
    not_in_alphabet = set("😀😃🎉👍🏽国日本語のテキスト")
    alphabet = sorted({c.replace(" ", "▁") for c in "".join(TRAINING_CORPUS)} - not_in_alphabet)
    trainer = trainers.BpeTrainer(
        vocab_size=160,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_CORPUS, trainer)
    # The BPE trainer cannot add SentencePiece's <0xNN> byte pieces; append
    # them to the trained vocabulary as ordinary (non-special) tokens.
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    first_byte_id = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = first_byte_id + byte
    return Tokenizer.from_str(json.dumps(spec))


def _train_byte_level_tokenizer() -> Tokenizer:
    """GPT-2 style byte-level BPE with a small vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_CORPUS, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> Tokenizer:
    return _train_metaspace_tokenizer()


@pytest.fixture(scope="module")
def byte_level_tokenizer() -> Tokenizer:
    return _train_byte_level_tokenizer()


@pytest.fixture(scope="module")
def smol_tokenizer() -> Tokenizer:
    """The real SmolLM2 tokenizer, from the embedded default model (converted once, cached)."""
    # The router alone does not depend on the shard; the dev environment has both.
    model_files = pytest.importorskip("tgis_shard.model_files")
    from tgis_shard.embedded import DEFAULT_MODEL

    model_dir = model_files.resolve_model_dir(DEFAULT_MODEL, None, model_files.default_cache_dir())
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(params=["metaspace", "byte_level", "smol"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return cast(Tokenizer, request.getfixturevalue(f"{request.param}_tokenizer"))


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def eos_id(tokenizer: Tokenizer) -> int:
    for content in ("</s>", "<|endoftext|>"):
        token_id = tokenizer.token_to_id(content)
        if token_id is not None:
            return token_id
    raise AssertionError("tokenizer has no known EOS token")


def special_ids(tokenizer: Tokenizer) -> list[int]:
    return sorted(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)


def decodable_text(tokenizer: Tokenizer, ids: Sequence[int], skip_special_tokens: bool) -> str:
    """Text of ``ids`` without a trailing incomplete character.

    The longest of ``decode(ids[:end]).rstrip("\ufffd")`` over the last 4 ends.
    Stripping U+FFFD from the full decode alone is not enough: ByteFallback
    decodes a whole run of byte tokens as U+FFFD while the run ends inside a
    character, complete characters of the run included. Cutting whole tokens
    alone is not enough either: a byte-level token can hold text *and* the
    first bytes of the next character (GPT-2 "Ġ\xf0\x9f\x98").
    """
    candidates = (
        tokenizer.decode(list(ids[:end]), skip_special_tokens=skip_special_tokens).rstrip(REPLACEMENT_CHAR)
        for end in range(len(ids), max(0, len(ids) - 3) - 1, -1)
    )
    return max(candidates, key=len)


def continuation_text(
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    generated: Sequence[int],
    skip_special_tokens: bool = True,
) -> str:
    """Reference: decode(prompt + generated) minus decode(prompt), see module doc."""
    base = decodable_text(tokenizer, prompt, skip_special_tokens)
    full = decodable_text(tokenizer, [*prompt, *generated], skip_special_tokens)
    assert full.startswith(base), "reference needs text that decodes stably"
    return full[len(base) :]


def run(
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    generated: Sequence[int],
    skip_special_tokens: bool = True,
) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed ``generated`` token by token; check invariants after every step."""
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas: list[str] = []
    for token_id in generated:
        delta = detok.add(token_id)
        assert isinstance(delta, str)
        deltas.append(delta)
        assert detok.window_size <= MAX_WINDOW_TOKENS
    assert detok.text == "".join(deltas)
    return deltas, detok


def is_char_boundary(tokenizer: Tokenizer, ids: Sequence[int], index: int) -> bool:
    """Whether splitting ``ids`` at ``index`` does not cut a character."""
    before = tokenizer.decode(list(ids[:index]), skip_special_tokens=False)
    after = tokenizer.decode(list(ids[index:]), skip_special_tokens=False)
    return not before.endswith(REPLACEMENT_CHAR) and not after.startswith(REPLACEMENT_CHAR)


# --------------------------------------------------------------------------
# The main invariant, on sequences produced by encoding real text
# --------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_equal_decoded_continuation_for_every_split(tokenizer: Tokenizer, text: str) -> None:
    ids = encode(tokenizer, text)
    assert ids
    for split in range(len(ids) + 1):
        prompt, generated = ids[:split], ids[split:]
        expected = continuation_text(tokenizer, prompt, generated)
        detok = IncrementalDetokenizer(tokenizer, prompt)
        deltas = []
        for token_id in generated:
            deltas.append(detok.add(token_id))
            # Never emits anything a later token would contradict, and never
            # shows a replacement character for valid text.
            assert expected.startswith(detok.text), (split, deltas)
            assert REPLACEMENT_CHAR not in detok.text
            assert detok.window_size <= MAX_WINDOW_TOKENS
        assert "".join(deltas) == detok.text == expected, (split, deltas)

        # The brief's definition (only the last 5 prompt ids as context)
        # agrees whenever that window starts on a character boundary.
        if is_char_boundary(tokenizer, prompt, max(0, len(prompt) - 5)):
            assert continuation_text(tokenizer, prompt[-5:], generated) == expected


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_inside_generation(tokenizer: Tokenizer, text: str, skip_special_tokens: bool) -> None:
    rng = random.Random(text)
    ids = encode(tokenizer, text)
    boundaries = [i for i in range(len(ids) + 1) if is_char_boundary(tokenizer, ids, i)]
    specials = special_ids(tokenizer)
    for _ in range(6):
        sequence = list(ids)
        # Insert from the back so earlier boundary indices stay valid.
        for index in sorted(rng.sample(boundaries, min(3, len(boundaries))), reverse=True):
            sequence.insert(index, rng.choice(specials))
        split = rng.randrange(len(sequence) + 1)
        prompt, generated = sequence[:split], sequence[split:]
        deltas, detok = run(tokenizer, prompt, generated, skip_special_tokens)
        expected = continuation_text(tokenizer, prompt, generated, skip_special_tokens)
        assert detok.text == expected, (prompt, generated, deltas)


# --------------------------------------------------------------------------
# Random ids
# --------------------------------------------------------------------------


def _standalone_decode_is_valid(tokenizer: Tokenizer, token_id: int) -> bool:
    return REPLACEMENT_CHAR not in tokenizer.decode([token_id], skip_special_tokens=False)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_of_complete_characters_match_exactly(
    tokenizer: Tokenizer, seed: int, skip_special_tokens: bool
) -> None:
    """Random ids, specials included, but only tokens that are whole characters.

    Such sequences are valid UTF-8 however they are combined, so the exact
    invariant must hold (tokens that decode to nothing, e.g. a lone "▁"
    first token, and arbitrary word junctions are exercised too).
    """
    rng = random.Random(seed)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    specials = special_ids(tokenizer)

    def draw() -> int:
        while True:
            token_id = rng.choice(specials) if rng.random() < 0.1 else rng.randrange(vocab_size)
            if _standalone_decode_is_valid(tokenizer, token_id):
                return token_id

    prompt = [draw() for _ in range(rng.randrange(8))]
    generated = [draw() for _ in range(200)]
    _, detok = run(tokenizer, prompt, generated, skip_special_tokens)
    expected = continuation_text(tokenizer, prompt, generated, skip_special_tokens)
    assert detok.text == expected


@pytest.mark.parametrize("seed", range(8))
def test_random_ids_with_invalid_bytes_weak_properties(tokenizer: Tokenizer, seed: int) -> None:
    """Arbitrary ids, biased towards byte tokens, so invalid UTF-8 occurs.

    Exact equality with a full decode is not guaranteed here: text already
    emitted cannot be taken back, while a full decode may re-interpret earlier
    bytes (ByteFallback turns a whole run of byte tokens into U+FFFDs once any
    byte in it is invalid). What must hold: no errors, deltas concatenate to
    ``text``, the window stays bounded, and once the garbage is followed by
    ordinary text that text comes out intact.
    """
    rng = random.Random(seed)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    partial_ids = [i for i in range(min(vocab_size, 5000)) if not _standalone_decode_is_valid(tokenizer, i)]
    assert partial_ids
    generated = [rng.choice(partial_ids) if rng.random() < 0.6 else rng.randrange(vocab_size) for _ in range(300)]
    generated += encode(tokenizer, "The end.")
    prompt = encode(tokenizer, "Start")
    deltas, detok = run(tokenizer, prompt, generated)
    assert detok.text.endswith("The end.")
    assert "".join(deltas) == detok.text


def test_invalid_byte_run_is_emitted_and_window_stays_bounded(
    metaspace_tokenizer: Tokenizer,
) -> None:
    tok = metaspace_tokenizer
    lone_continuation = tok.token_to_id("<0x80>")
    generated = [lone_continuation] * 200 + encode(tok, "The end.")
    deltas, detok = run(tok, encode(tok, "Start"), generated)
    # Invalid bytes cannot be completed by any later byte: they show up as
    # U+FFFD (as in a full decode) instead of being held back forever.
    assert REPLACEMENT_CHAR in detok.text
    assert detok.text.endswith(" The end.")
    assert max(len(d) for d in deltas) < 3 * MAX_WINDOW_TOKENS


# --------------------------------------------------------------------------
# Targeted behaviour
# --------------------------------------------------------------------------


def test_first_token_keeps_leading_space(tokenizer: Tokenizer) -> None:
    prompt = encode(tokenizer, "The capital of France is")
    ids = encode(tokenizer, "The capital of France is Paris")
    assert ids[: len(prompt)] == prompt
    generated = ids[len(prompt) :]
    assert len(generated) == 1
    deltas, _ = run(tokenizer, prompt, generated)
    assert deltas == [" Paris"]


def test_metaspace_token_alone_would_lose_its_space(metaspace_tokenizer: Tokenizer) -> None:
    """The pitfall the prompt context exists for."""
    paris = metaspace_tokenizer.token_to_id("▁Paris")
    assert metaspace_tokenizer.decode([paris]) == "Paris"
    deltas, _ = run(metaspace_tokenizer, encode(metaspace_tokenizer, "is"), [paris])
    assert deltas == [" Paris"]


def test_word_split_over_several_tokens(metaspace_tokenizer: Tokenizer) -> None:
    tok = metaspace_tokenizer
    prompt = encode(tok, "It was")
    generated = encode(tok, "It was unbelievably")[len(prompt) :]
    assert len(generated) > 3
    deltas, detok = run(tok, prompt, generated)
    assert all(deltas)
    assert deltas[0] == " "
    assert detok.text == " unbelievably"


def test_emoji_split_over_byte_fallback_tokens(metaspace_tokenizer: Tokenizer) -> None:
    tok = metaspace_tokenizer
    prompt = encode(tok, "Hi")
    generated = encode(tok, "Hi 😀")[len(prompt) :]
    assert [tok.id_to_token(i) for i in generated] == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    deltas, _ = run(tok, prompt, generated)
    assert deltas == [" ", "", "", "", "😀"]


def test_cjk_split_over_byte_level_tokens(byte_level_tokenizer: Tokenizer) -> None:
    tok = byte_level_tokenizer
    prompt = encode(tok, "Hi")
    generated = encode(tok, "Hi 测试")[len(prompt) :]
    assert len(generated) == 7  # "Ġ" and one token per byte
    deltas, _ = run(tok, prompt, generated)
    assert deltas == [" ", "", "", "测", "", "", "试"]


def test_token_with_text_and_partial_character(byte_level_tokenizer: Tokenizer) -> None:
    """A byte-level token may end with the first bytes of the next character.

    Its complete part is emitted at once; waiting for the whole window would
    lose it if generation stopped right there.
    """
    tok = byte_level_tokenizer
    prompt = encode(tok, "Hello")
    generated = encode(tok, "Hello 👍🏽")[len(prompt) :]
    assert len(generated) == 2  # " 👍" + 2 bytes of 🏽, then the other 2
    deltas, _ = run(tok, prompt, generated)
    assert deltas == [" 👍", "🏽"]
    stopped, _ = run(tok, prompt, generated[:1])
    assert stopped == [" 👍"]


def test_space_and_emoji_prefix_in_one_smol_token(smol_tokenizer: Tokenizer) -> None:
    tok = smol_tokenizer
    prompt = encode(tok, "Hi")
    generated = encode(tok, "Hi 😀")[len(prompt) :]
    assert [tok.id_to_token(i) for i in generated] == ["ĠðŁĺ", "Ģ"]
    deltas, _ = run(tok, prompt, generated)
    assert deltas == [" ", "😀"]


def test_eos_is_skipped(tokenizer: Tokenizer) -> None:
    prompt = encode(tokenizer, "The capital of France is")
    generated = [*encode(tokenizer, "The capital of France is Paris")[len(prompt) :]]
    generated.append(eos_id(tokenizer))
    deltas, detok = run(tokenizer, prompt, generated)
    assert deltas[-1] == ""
    assert detok.text == " Paris"


def test_eos_is_shown_without_skip_special_tokens(tokenizer: Tokenizer) -> None:
    prompt = encode(tokenizer, "The capital of France is")
    generated = [*encode(tokenizer, "The capital of France is Paris")[len(prompt) :]]
    eos = eos_id(tokenizer)
    generated.append(eos)
    deltas, detok = run(tokenizer, prompt, generated, skip_special_tokens=False)
    assert deltas[-1] == tokenizer.id_to_token(eos)
    assert detok.text == " Paris" + tokenizer.id_to_token(eos)


def test_skipped_special_token_between_words(metaspace_tokenizer: Tokenizer) -> None:
    tok = metaspace_tokenizer
    ids = encode(tok, "The capital of France is Paris")
    eos = eos_id(tok)
    detok = IncrementalDetokenizer(tok, ids[:4])
    assert detok.add(ids[4]) == " is"
    size = detok.window_size
    assert detok.add(eos) == ""
    assert detok.window_size == size  # skipped tokens take no window slot
    assert detok.add(ids[5]) == " Paris"


def test_unknown_ids_are_ignored(metaspace_tokenizer: Tokenizer) -> None:
    tok = metaspace_tokenizer
    detok = IncrementalDetokenizer(tok, encode(tok, "The"))
    size = detok.window_size
    assert detok.add(tok.get_vocab_size(with_added_tokens=True) + 10) == ""
    assert detok.window_size == size


def test_empty_prompt(metaspace_tokenizer: Tokenizer, byte_level_tokenizer: Tokenizer) -> None:
    # Without context, the first token is decoded as the start of a text,
    # exactly like decode(generated): SentencePiece drops the leading space.
    meta = metaspace_tokenizer
    generated = encode(meta, "Paris is nice")
    assert run(meta, [], generated)[1].text == "Paris is nice" == meta.decode(generated)
    # Byte-level BPE has no such rule.
    byte_level = byte_level_tokenizer
    generated = encode(byte_level, " Paris 😀")
    assert run(byte_level, [], generated)[1].text == " Paris 😀"


def test_prompt_of_special_tokens_only_behaves_like_empty_prompt(
    metaspace_tokenizer: Tokenizer,
) -> None:
    tok = metaspace_tokenizer
    generated = encode(tok, "Paris is nice")
    bos = tok.token_to_id("<s>")
    assert run(tok, [bos], generated)[1].text == run(tok, [], generated)[1].text
    # Without skipping, "<s>" is context and the first space survives.
    assert run(tok, [bos], generated, skip_special_tokens=False)[1].text == " Paris is nice"


def test_prompt_ending_inside_a_character(metaspace_tokenizer: Tokenizer) -> None:
    """Generated bytes completing a character begun in the prompt produce it."""
    tok = metaspace_tokenizer
    ids = encode(tok, "Hi 😀 there")
    cut = ids.index(tok.token_to_id("<0x98>"))
    deltas, _ = run(tok, ids[:cut], ids[cut:])
    assert deltas[:2] == ["", "😀"]
    assert "".join(deltas) == "😀 there"


def test_generation_continuing_a_byte_run_of_the_prompt(metaspace_tokenizer: Tokenizer) -> None:
    """The context must start on a character boundary, not at "last 5 ids".

    The prompt ends in two emoji spelled as 8 byte tokens; the generation
    continues the same ByteFallback run with a third one. Decoding just the
    last 5 prompt ids (starting at a continuation byte) makes the whole run
    invalid; the detokenizer extends its context back to the lead byte.
    """
    tok = metaspace_tokenizer
    prompt = encode(tok, "Hi 😀😀")
    generated = encode(tok, "Hi 😀😀😀")[len(prompt) :]
    assert len(generated) == 4
    naive = continuation_text(tok, prompt[-5:], generated)
    assert naive != "😀"  # the pitfall
    deltas, _ = run(tok, prompt, generated)
    assert deltas == ["", "", "", "😀"]


# --------------------------------------------------------------------------
# O(1) work per token (structural, not timing)
# --------------------------------------------------------------------------


class CountingTokenizer:
    """Proxy recording how many ids each ``decode`` call is given."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.calls = 0
        self.total_ids = 0
        self.max_ids = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.calls += 1
        self.total_ids += len(ids)
        self.max_ids = max(self.max_ids, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.mark.parametrize("garbage", [False, True])
def test_work_per_token_is_bounded_over_2000_tokens(tokenizer: Tokenizer, garbage: bool) -> None:
    if garbage:
        rng = random.Random(0)
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        generated = [rng.randrange(vocab_size) for _ in range(2000)]
    else:
        stream: list[int] = []
        while len(stream) < 2000:
            stream += encode(tokenizer, " ".join(TEXTS))
        generated = stream[:2000]
    prompt = encode(tokenizer, "The capital of France is")

    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(cast(Tokenizer, counting), prompt)
    sizes = []
    for token_id in generated:
        detok.add(token_id)
        sizes.append(detok.window_size)

    assert max(sizes) <= MAX_WINDOW_TOKENS
    assert counting.max_ids <= MAX_WINDOW_TOKENS
    # At most one decode of the window per token plus one (rarely a few) to
    # re-establish the context after emitting: linear in the token count.
    assert counting.calls <= 3 * len(generated) + 10
    assert counting.total_ids <= counting.calls * MAX_WINDOW_TOKENS
    if not garbage:
        assert detok.text == continuation_text(tokenizer, prompt, generated)
