"""Long work's progress where no terminal shows a bar: log lines every interval and one at the
end (also when the work ends short of its total), never carriage returns; a bar on a terminal."""

from __future__ import annotations

import logging
import sys

import pytest
from tqdm.auto import tqdm

from tgis_shard import progress as progress_module
from tgis_shard.progress import LoggedProgress, progress, progress_class


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="tgis_shard.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "tgis_shard.progress"]


def test_a_finished_count_logs_one_line_with_its_total(lines):
    with LoggedProgress(total=5, desc="loading model", unit="tensors") as bar:
        for _ in range(5):
            bar.update()
    (line,) = lines()
    assert line.startswith("loading model: 100%")
    assert "5/5" in line
    assert "\r" not in line


def test_lines_come_every_interval_while_it_runs(lines, monkeypatch):
    monkeypatch.setattr(progress_module, "PROGRESS_LOG_INTERVAL_S", 0.0)
    with LoggedProgress(total=4, desc="converting") as bar:
        for _ in range(4):
            bar.update()
    logged = lines()
    assert len(logged) >= 4  # one per update at a zero interval, the last at 100 %
    assert logged[-1].startswith("converting: 100%")
    assert len([line for line in logged if "100%" in line]) == 1


def test_work_ending_short_of_its_total_still_logs_where_it_ended(lines):
    bar = LoggedProgress(total=10, desc="loading", unit="tensors")
    bar.update(7)
    bar.close()
    (line,) = lines()
    assert "7/10" in line


def test_iterating_and_disabled_bars(lines):
    assert list(progress(3, "warm-up", iterable=["a", "b", "c"])) == ["a", "b", "c"]
    assert any("3/3" in line for line in lines())
    quiet = progress(2, "rank 1", disable=True)
    quiet.update(2)
    quiet.close()
    assert not any(line.startswith("rank 1") for line in lines())


def test_a_terminal_gets_tqdm_s_bar_and_anything_else_log_lines(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress_class() is tqdm
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress_class() is LoggedProgress


def test_transformers_bars_are_off_where_no_terminal_shows_them(monkeypatch):
    from transformers.utils import logging as transformers_logging

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    try:
        transformers_logging.enable_progress_bar()
        progress_module.library_bars_follow_terminal()
        assert not transformers_logging.is_progress_bar_enabled()
        transformers_logging.enable_progress_bar()
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
        progress_module.library_bars_follow_terminal()
        assert transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
