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


def parse_bool(value: str) -> bool:
    """An option's true or false in any of the words above."""
    lowered = value.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors (JSON_OUTPUT)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)  # structured fields a line carries (logging's extra=)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# TGIS's level names (Rust's tracing) beside Python's.
_LEVELS = {
    "trace": "DEBUG",
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
    "critical": "CRITICAL",
}


def parse_log_level(value: str) -> tuple[str, dict[str, str]]:
    """LOG_LEVEL as TGIS takes it: a level (``info``, ``warn``, ``trace``, ...) and/or per-module
    directives, comma-separated (``warn,tgis_router=debug``). Returns the root level and the
    level of each named logger; ValueError for anything else."""
    root, modules = "INFO", {}
    for directive in filter(None, (d.strip() for d in value.split(","))):
        module, _, level = directive.rpartition("=")
        name = _LEVELS.get(level.strip().lower())
        if name is None:
            raise ValueError(f"unknown log level {level.strip()!r} in {value!r}")
        if module:
            modules[module.strip()] = name
        else:
            root = name
    return root, modules


def configure_logging(level: str, json_output: bool) -> None:
    """Every record to stderr, one line each, at ``level`` (``parse_log_level``'s forms) and above."""
    root, modules = parse_log_level(level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_output else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=root, handlers=[handler], force=True)
    for module, module_level in modules.items():
        logging.getLogger(module).setLevel(module_level)


def configure_logging_from_env(environ: Mapping[str, str] = os.environ) -> None:
    """LOG_LEVEL and JSON_OUTPUT as the launcher passes them on to the processes it starts."""
    json_output = environ.get("JSON_OUTPUT", "false").strip().lower() in TRUE_WORDS
    configure_logging(environ.get("LOG_LEVEL", "info"), json_output)
