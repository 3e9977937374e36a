"""Progress of long work (download, conversion, model load, warm-up, graph capture): a bar on a
terminal; where no terminal shows one (a pod's log, a file), one log line every
``PROGRESS_LOG_INTERVAL_S`` and one at the end, instead of a stream of carriage returns."""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger("tgis_shard.progress")
PROGRESS_LOG_INTERVAL_S = 10.0
T = TypeVar("T")


class LoggedProgress(tqdm):
    """tqdm's counting and rates, written as log lines."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.update(file=io.StringIO(), mininterval=PROGRESS_LOG_INTERVAL_S, ascii=True)
        self._logged_at = time.monotonic()  # before tqdm's __init__, which displays once
        self._logged_done = False
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.monotonic()
        done = bool(self.total) and self.n >= self.total
        if (now - self._logged_at >= PROGRESS_LOG_INTERVAL_S or done) and not self._logged_done:
            self._logged_at, self._logged_done = now, done
            log.info("%s", self.format_meter(**self.format_dict).strip())
        return True

    def close(self) -> None:
        # Work that ends short of its total (tensors a model never reads) still says it ended.
        if not self.disable and not self._logged_done and self.n:
            self._logged_done = True
            log.info("%s", self.format_meter(**self.format_dict).strip())
        super().close()


def library_bars_follow_terminal() -> None:
    """transformers' own bars (loading a model's weights) draw only on a terminal too: in a log
    they would be a stream of carriage returns; our log lines say where loading is instead."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def progress_class() -> type[tqdm]:
    return tqdm if sys.stderr.isatty() else LoggedProgress


def progress(
    total: int | None, desc: str, unit: str = "it", disable: bool = False, iterable: Iterable[T] | None = None
) -> tqdm:
    """A progress bar for ``total`` units of work (iterating ``iterable`` if given), or its log
    lines (see the module's docstring)."""
    bar = progress_class()
    return bar(iterable, total=total, desc=desc, unit=unit, disable=disable, unit_scale=unit == "B")
