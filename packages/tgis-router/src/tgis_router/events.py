"""What the batcher tells a waiting RPC about its input, in order, through an asyncio queue."""

from __future__ import annotations

from dataclasses import dataclass

from tgis_router.errors import RouterError
from tgis_router.requests import StopReason


@dataclass(frozen=True)
class TokenDetail:
    """A token as TokenInfo shows it (raw vocabulary text)."""

    text: str
    logprob: float = float("nan")
    rank: int = 0
    top_tokens: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Finish:
    """The end of an input; ``text`` is text held back for stop sequences, released now;
    ``error`` is what the client gets when ``reason`` is ERROR."""

    reason: StopReason
    stop_sequence: str = ""
    error: RouterError | None = None
    text: str = ""


@dataclass(frozen=True)
class InputTokens:
    tokens: tuple[TokenDetail, ...]


@dataclass(frozen=True)
class NewToken:
    """One generated token: its text delta, the running count, and maybe the end."""

    text: str
    generated_token_count: int
    token: TokenDetail
    finish: Finish | None = None


Event = InputTokens | NewToken | Finish
