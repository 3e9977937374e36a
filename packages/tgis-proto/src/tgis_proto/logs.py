"""Logging set-up shared by the launcher, the router and the shards: plain text or JSON lines."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping

# How TGIS's boolean settings (JSON_OUTPUT, OUTPUT_SPECIAL_TOKENS, ...) are spelled.
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors (JSON_OUTPUT)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, json_output: bool) -> None:
    """Every record to stderr, one line each, at ``level`` and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_output else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)


def configure_logging_from_env(environ: Mapping[str, str] = os.environ) -> None:
    """LOG_LEVEL and JSON_OUTPUT as the launcher passes them on to the processes it starts."""
    json_output = environ.get("JSON_OUTPUT", "false").strip().lower() in TRUE_WORDS
    configure_logging(environ.get("LOG_LEVEL", "INFO").upper(), json_output)
