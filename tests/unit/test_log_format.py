"""The log formats of ``process/runtime.py`` and the TOML that ``check-config`` prints: control
characters never reach a log line raw (C1 ones included, which JSON itself would leave), a JSON
record is one line whatever it holds, and every string a setting can hold prints as TOML that
reads back."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tomllib

import pytest

from shardbroker.cli.main import _toml_value
from shardbroker.process.runtime import (
    ANNOUNCE,
    LOG_FORMAT,
    EscapingFormatter,
    JsonFormatter,
    setup_logging,
)


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("shardbroker.clients", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_escape_c0_and_c1_controls_in_the_message_and_the_fields() -> None:
    cid = "a\nb\x1b[31m\x9b2J\x7f"
    line = JsonFormatter().format(_record("client %s connected", cid, client_id=cid, version="5.0"))
    assert "\n" not in line and "\x1b" not in line and "\x9b" not in line and "\x7f" not in line
    doc = json.loads(line)
    assert doc["msg"] == "client a\\x0ab\\x1b[31m\\x9b2J\\x7f connected"
    assert doc["client_id"] == "a\\x0ab\\x1b[31m\\x9b2J\\x7f" and doc["version"] == "5.0"
    assert doc["level"] == "INFO" and doc["logger"] == "shardbroker.clients" and "reason" not in doc


def test_a_json_traceback_stays_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc"]


def test_text_lines_escape_the_same_way() -> None:
    text = EscapingFormatter(LOG_FORMAT).format(_record("client %s", "x\x9by\n"))
    assert text.endswith("client x\\x9by\\x0a")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_announce_logger_writes_at_every_level(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("error", fmt)
        logging.getLogger(ANNOUNCE).info("listening on 127.0.0.1:%d (mqtt)", 4242)
        logging.getLogger("shardbroker.process.supervisor").info("shutting down")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger(ANNOUNCE).setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "listening on 127.0.0.1:4242 (mqtt)" in lines[0]
    if fmt == "json":
        assert json.loads(lines[0])["logger"] == ANNOUNCE


def test_text_lines_are_the_standard_formatters_with_the_time_formatted_once_a_second() -> None:
    ours, standard = EscapingFormatter(LOG_FORMAT), logging.Formatter(LOG_FORMAT)
    for created in (1_700_000_000.004, 1_700_000_000.999, 1_700_000_001.0, 1_700_000_061.5, 1_700_000_000.25):
        record = _record("client %s connected", "a")
        record.created, record.msecs = created, (created - int(created)) * 1000
        record.process = 4242
        assert ours.format(record) == standard.format(record)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_records_made_without_a_process_id_carry_the_formatters(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("info", fmt)
        logging.getLogger("shardbroker.clients").info("client %s connected", "a")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger(ANNOUNCE).setLevel(logging.NOTSET)
    [line] = stream.getvalue().splitlines()
    if fmt == "json":
        assert json.loads(line)["pid"] == os.getpid()
    else:
        assert f"INFO shardbroker.clients[{os.getpid()}]: client a connected" in line


@pytest.mark.parametrize("value", ['q"uote\\back', "tab\there", "nl\nx", "del\x7f", "é ☃ \U0001f600", ""])
def test_toml_strings_read_back(value: str) -> None:
    assert tomllib.loads(f"v = {_toml_value(value)}")["v"] == value


def test_toml_numbers_booleans_and_lists_read_back() -> None:
    for value in (0, 4294967295, 2.5, 1e-05, True, False, ["a/#", "b"], []):
        assert tomllib.loads(f"v = {_toml_value(value)}")["v"] == value
