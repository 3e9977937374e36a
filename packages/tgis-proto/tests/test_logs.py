"""Log lines: JSON objects for collectors (JSON_OUTPUT), plain text otherwise."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from tgis_proto.logs import JsonFormatter, configure_logging, configure_logging_from_env, parse_log_level


def test_json_formatter_writes_one_object_per_record_with_the_exception() -> None:
    try:
        raise ValueError("bad shape")
    except ValueError:
        record = logging.LogRecord("tgis_shard", logging.ERROR, __file__, 1, "step %d failed", (7,), True)
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "tgis_shard"
    assert entry["message"] == "step 7 failed"
    assert "ValueError: bad shape" in entry["exception"]


@pytest.mark.parametrize("json_output", [True, False])
def test_configured_logging_writes_the_chosen_format_to_stderr(restored_logging, capsys, json_output) -> None:
    configure_logging("INFO", json_output)
    logging.getLogger("tgis_router").info("serving on %d", 8033)
    logging.getLogger("tgis_router").debug("not shown at INFO")
    (line,) = capsys.readouterr().err.splitlines()
    if json_output:
        assert json.loads(line)["message"] == "serving on 8033"
    else:
        assert line.endswith("INFO tgis_router: serving on 8033")


@pytest.mark.parametrize(
    ("value", "is_json"), [("true", True), ("1", True), ("Yes", True), ("false", False), ("", False)]
)
def test_logging_from_env_reads_json_output_and_log_level(restored_logging, capsys, value, is_json) -> None:
    configure_logging_from_env({"JSON_OUTPUT": value, "LOG_LEVEL": "warning"})
    logging.getLogger("tgis_shard").info("below the level")
    logging.getLogger("tgis_shard").warning("shard %d slow", 1)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("{") == is_json
    assert "shard 1 slow" in line


def test_log_level_directives_as_tgis_takes_them():
    assert parse_log_level("warn") == ("WARNING", {})
    assert parse_log_level("trace") == ("DEBUG", {})
    assert parse_log_level("tgis_router=debug, error") == ("ERROR", {"tgis_router": "DEBUG"})
    with pytest.raises(ValueError, match="unknown log level 'verbose'"):
        parse_log_level("verbose")


def test_a_module_directive_lowers_that_module_alone(restored_logging, capsys) -> None:
    configure_logging("warn,tgis_router.batcher=debug", json_output=False)
    logging.getLogger("tgis_router.batcher").debug("step %d planned", 3)
    logging.getLogger("tgis_router.grpc_server").info("not shown at warn")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("DEBUG tgis_router.batcher: step 3 planned")
