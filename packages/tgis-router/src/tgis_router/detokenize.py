"""Incremental (streaming) detokenization of generated token ids.

The router streams text to clients one token at a time. Decoding each new
token on its own is wrong for two reasons:

* Tokenizers are context dependent at the start of a decode. SentencePiece /
  Metaspace style tokenizers (Llama, Mistral, ...) strip the leading space of
  the first token, so ``decode([id("▁Paris")]) == "Paris"`` while a client that
  sent "The capital of France is" expects the continuation " Paris".
* A single token may be only part of a UTF-8 character: byte-fallback
  tokenizers spell emoji / rare CJK as ``<0xF0><0x9F><0x98><0x80>`` and
  byte-level BPE (GPT-2 style) may split a character's bytes across tokens.
  Decoding such a prefix yields U+FFFD replacement characters that must never
  reach the client.

Re-decoding the whole generation after every token fixes both but costs O(n)
per token (O(n^2) per request). :class:`IncrementalDetokenizer` instead keeps a
small window of token ids: a few already-emitted *context* tokens followed by
the *pending* tokens whose text has not been fully emitted yet. Each
:meth:`~IncrementalDetokenizer.add` decodes only that window and emits what the
window's decode adds beyond the decode of its context. Once the pending text is
complete (it does not end in U+FFFD) the window is shrunk back to a few context
tokens, so every step costs O(1).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Final

from tokenizers import Tokenizer

__all__ = [
    "CONTEXT_TOKENS",
    "MAX_CONTEXT_TOKENS",
    "MAX_PENDING_TOKENS",
    "MAX_WINDOW_TOKENS",
    "REPLACEMENT_CHAR",
    "IncrementalDetokenizer",
]

#: What decoders produce for bytes that are not (yet) valid UTF-8.
REPLACEMENT_CHAR: Final = "\ufffd"

#: Number of already-emitted tokens kept in front of the pending ones. One
#: token is enough to absorb a Metaspace/Strip "first token loses its leading
#: space" rule; a few more are cheap insurance for decoders whose output for a
#: token depends on its neighbours (e.g. WordPiece clean-up of " .").
CONTEXT_TOKENS: Final = 5

#: How far back (in tokens) the context may be extended so that it starts on a
#: character boundary. A UTF-8 character has at most 4 bytes and every token
#: carries at least one byte, so 3 extra tokens always reach a character's
#: first byte, and 3 more cover a prompt ending in up to 3 tokens of an
#: incomplete character; beyond this the bytes are garbage and we stop looking.
MAX_CONTEXT_TOKENS: Final = CONTEXT_TOKENS + 7

#: A still-incomplete character can span at most 4 byte-carrying tokens. If the
#: pending tokens keep decoding to a trailing U+FFFD for this many tokens, the
#: bytes are invalid (not merely incomplete): they are emitted as U+FFFD, just
#: as a full decode would show them, so that the window stays bounded.
MAX_PENDING_TOKENS: Final = 16

#: Upper bound of :attr:`IncrementalDetokenizer.window_size` after any call.
MAX_WINDOW_TOKENS: Final = MAX_CONTEXT_TOKENS + MAX_PENDING_TOKENS


# Per-tokenizer cache: listing the added tokens costs O(#added tokens) (some
# vocabularies reserve thousands), too much to repeat for every request.
_SPECIAL_CONTENTS: weakref.WeakKeyDictionary[Tokenizer, frozenset[str]] = weakref.WeakKeyDictionary()


def _special_contents(tokenizer: Tokenizer) -> frozenset[str]:
    """Contents of the tokenizer's special tokens (cached; tokenizers are
    assumed not to gain special tokens once requests are served).

    ``Tokenizer.decode(skip_special_tokens=True)`` drops a token when its
    *content* is that of a special added token, so match on content rather
    than on ids.
    """
    contents = _SPECIAL_CONTENTS.get(tokenizer)
    if contents is None:
        contents = frozenset(added.content for added in tokenizer.get_added_tokens_decoder().values() if added.special)
        _SPECIAL_CONTENTS[tokenizer] = contents
    return contents


class IncrementalDetokenizer:
    """Turn a stream of generated token ids into a stream of text deltas.

    The generated text is defined as the decode of the generated ids *as a
    continuation of the prompt*: ``decode(prompt + generated)`` minus
    ``decode(prompt)``, where an incomplete UTF-8 sequence at the very end is
    held back until a later token completes it (and is never emitted if no
    token does). Special tokens are dropped when ``skip_special_tokens`` is
    true; no clean-up of spaces is applied beyond what the tokenizer's own
    decoder does.

    Only the last few prompt tokens are used as context (see
    :data:`CONTEXT_TOKENS`), so construction is cheap even for long prompts.

    Example::

        detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        for token_id in generated:
            send(detok.add(token_id))  # " Paris", "", "😀", ...
        assert detok.text == "".join(all_sent)
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        """Create a detokenizer for one sequence.

        Args:
            tokenizer: The model's ``tokenizers.Tokenizer``.
            prompt_ids: Token ids of the prompt; generated text continues them.
            skip_special_tokens: Drop special tokens (EOS, chat markers, ...)
                from the text, as ``Tokenizer.decode`` does with this flag.
        """
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._special_contents = _special_contents(tokenizer) if skip_special_tokens else frozenset()

        # Window of token ids that is decoded on every ``add``:
        # ``_tokens[:_context_len]`` is already-emitted context whose decode is
        # ``_context_text``; the rest is pending. ``_pending_text`` is the part
        # of the pending tokens' text that has already been emitted (a stable
        # prefix emitted while the window still ended in an incomplete char).
        self._tokens: list[int] = []
        self._context_len = 0
        self._context_text = ""
        self._pending_text = ""

        # Emitted deltas; joined lazily so ``text`` is amortised O(1).
        self._parts: list[str] = []

        # Tokens that decode to nothing (skipped specials, unknown ids) are
        # left out: they would only waste window slots, and a context made of
        # nothing but such tokens would lose the leading-space context.
        context: list[int] = []
        for token_id in reversed(prompt_ids):
            if len(context) == MAX_CONTEXT_TOKENS:
                break
            if self._contributes(token_id):
                context.append(token_id)
        context.reverse()
        # A prompt cut inside a character (rare: ids supplied directly) ends
        # in up to 3 bytes of an incomplete character; those become pending
        # so that generated bytes completing the character produce it.
        self._set_window(context, max_incomplete_tail=3)

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of ``add`` results)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def window_size(self) -> int:
        """Number of token ids decoded per ``add``; bounded by
        :data:`MAX_WINDOW_TOKENS`, which is what makes ``add`` O(1)."""
        return len(self._tokens)

    def add(self, token_id: int) -> str:
        """Append one generated token and return the text it produced.

        Returns ``""`` when the token adds no text yet, e.g. a skipped special
        token or a byte token in the middle of a multi-byte character; the
        held-back text is returned by the call whose token completes it.
        """
        if not self._contributes(token_id):
            return ""
        self._tokens.append(token_id)
        decoded = self._decode(self._tokens)
        # The context decodes identically inside the window for valid text, so
        # everything after it belongs to the pending tokens. For invalid byte
        # sequences a decoder may re-interpret earlier bytes (ByteFallback
        # decodes a whole run of byte tokens as one unit); emitted text cannot
        # be taken back, so slicing by length is then merely a sensible guess.
        consistent = decoded.startswith(self._context_text)
        tail = decoded[len(self._context_text) :]
        pending_count = len(self._tokens) - self._context_len

        if decoded.endswith(REPLACEMENT_CHAR) and pending_count < MAX_PENDING_TOKENS:
            # Incomplete character at the end: wait for more bytes. Text before
            # it is final (UTF-8 decoding never revisits a completed
            # character), so emit it now; otherwise a token such as GPT-2's
            # " \xf0\x9f\x98" (space + emoji prefix) would withhold the space
            # and, if generation stopped there, lose it entirely.
            if not (consistent and tail.startswith(self._pending_text)):
                # A byte-fallback run is being re-decoded (all U+FFFD until it
                # is complete): nothing is stable yet.
                return ""
            stable = tail.rstrip(REPLACEMENT_CHAR)
            delta = stable[len(self._pending_text) :]
            if delta:
                self._pending_text = stable
                self._parts.append(delta)
            return delta

        # Either the text is complete, or the pending bytes are invalid beyond
        # any possible completion (then they are shown as U+FFFD, like a full
        # decode would). Emit the rest and shrink the window.
        delta = tail[len(self._pending_text) :]
        self._set_window(self._tokens, max_incomplete_tail=0)
        if delta:
            self._parts.append(delta)
        return delta

    def _contributes(self, token_id: int) -> bool:
        """Whether ``Tokenizer.decode`` would keep this id at all."""
        token = self._tokenizer.id_to_token(token_id)
        # Unknown ids are silently dropped by ``decode``; so are special tokens
        # when skipping them.
        return token is not None and token not in self._special_contents

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _set_window(self, tokens: list[int], *, max_incomplete_tail: int) -> None:
        """Re-base the window on the last few of ``tokens``.

        Picks ``start <= end`` so that ``tokens[start:end]`` becomes the
        (fully emitted) context and ``tokens[end:]`` stays pending. The context
        should:

        * start on a character boundary: a ByteFallback decoder decodes a run
          of byte tokens as a unit, so a window starting at a continuation
          byte turns the whole run into U+FFFD, also for later tokens;
        * end on a character boundary, for the same reason. Only a prompt can
          end inside a character; up to ``max_incomplete_tail`` of its tokens
          (3: a character has at most 4 bytes) are then left pending.

        The first candidate (last ``CONTEXT_TOKENS`` tokens, ending at the
        end) almost always fits, costing one decode; otherwise the context
        grows backwards up to ``MAX_CONTEXT_TOKENS`` and/or ends earlier.

        The context may decode to "" (e.g. a lone Metaspace "▁"): that token
        still absorbs the decoder's "first token loses its leading space"
        rule, which is all the context is needed for at the start.
        """
        n = len(tokens)
        floor = max(0, n - MAX_CONTEXT_TOKENS)
        for end in range(n, max(0, n - max_incomplete_tail) - 1, -1):
            if end == 0:
                # Nothing before the incomplete tail: no context at all.
                self._install(tokens, 0, 0, "")
                return
            for start in range(max(0, end - CONTEXT_TOKENS), min(floor, end - 1) - 1, -1):
                text = self._decode(tokens[start:end])
                if not text.startswith(REPLACEMENT_CHAR) and not text.endswith(REPLACEMENT_CHAR):
                    self._install(tokens, start, end, text)
                    return
        # No token boundary is a character boundary: invalid bytes, or a
        # byte-level prompt whose last tokens each hold a complete character
        # plus the first bytes of the next one (possible for CJK). Use
        # everything as context; for a prompt, without its incomplete last
        # character, which the generation will complete. (After a forced
        # emission the U+FFFDs were emitted and must stay in the context.)
        start = max(0, n - CONTEXT_TOKENS)
        text = self._decode(tokens[start:])
        while start > floor and text.startswith(REPLACEMENT_CHAR):
            start -= 1
            text = self._decode(tokens[start:])
        if max_incomplete_tail:
            text = text.rstrip(REPLACEMENT_CHAR)
        self._install(tokens, start, n, text)

    def _install(self, tokens: list[int], start: int, end: int, context_text: str) -> None:
        """Make ``tokens[start:]`` the window, ``tokens[start:end]`` its context."""
        self._tokens = tokens[start:]
        self._context_len = end - start
        self._context_text = context_text
        self._pending_text = ""
        if end < len(tokens):
            # The final part of a prompt's incomplete tail (the "na" of GPT-2
            # "na\xc3", the space of "Ġ\xf0\x9f\x98") is prompt text, not
            # generated text: count it as already emitted.
            window_text = self._decode(self._tokens)
            if window_text.startswith(context_text):
                self._pending_text = window_text[len(context_text) :].rstrip(REPLACEMENT_CHAR)
