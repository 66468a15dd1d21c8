"""logs.py (formatters, setup, request ids), the access log line and `up`'s state lines:
pure functions and formatters, no sockets."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from modelfleet.gateway.access import RequestRecord, access_fields, access_message, request_id_of
from modelfleet.logs import (
    THIRD_PARTY,
    JsonFormatter,
    TextFormatter,
    new_request_id,
    resolve_format,
    setup_logging,
    valid_request_id,
)
from modelfleet.up import ModelWatch, model_lines

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def record(msg: str, *args: object, extra: dict[str, object] | None = None, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    r = logging.getLogger("modelfleet.gateway").makeRecord(
        "modelfleet.gateway", logging.INFO, __file__, 1, msg, args, exc_info, extra=extra
    )
    return r


def test_text_format_is_one_line_with_utc_time_level_and_component() -> None:
    line = TextFormatter().format(
        record(
            "controller ready at %s (store %s)",
            "http://127.0.0.1:8100",
            "sqlite:////a/very/long/path/" + "x" * 200 + "/state.db",
            extra={"model": "m"},
        )
    )
    assert re.fullmatch(
        ISO + r" INFO modelfleet\.gateway: controller ready at http://127\.0\.0\.1:8100 "
        r"\(store sqlite:////a/very/long/path/x{200}/state\.db\)",
        line,
    ), line
    assert "\n" not in line  # long values are never wrapped


def test_text_format_puts_a_traceback_after_the_line() -> None:
    out = TextFormatter().format(record("failed", exc=True))
    first, *rest = out.splitlines()
    assert first.endswith("INFO modelfleet.gateway: failed")
    assert rest[0].startswith("Traceback") and rest[-1] == "ValueError: boom"


def test_json_format_carries_role_component_message_and_fields() -> None:
    obj = json.loads(
        JsonFormatter("worker").format(
            record(
                "instance %s: ready",
                "w1/m",
                extra={"instance": "w1/m", "model": "m", "duration_ms": 12.5, "path": object()},
            )
        )
    )
    assert re.fullmatch(ISO, obj.pop("time"))
    path = obj.pop("path")
    assert path.startswith("<object object")  # what JSON cannot hold is written as text
    assert obj == {
        "level": "INFO",
        "role": "worker",
        "component": "modelfleet.gateway",
        "message": "instance w1/m: ready",
        "instance": "w1/m",
        "model": "m",
        "duration_ms": 12.5,
    }


def test_json_format_keeps_a_traceback_in_one_field_on_one_line() -> None:
    line = JsonFormatter("gateway").format(record("failed", exc=True))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["exc"].startswith("Traceback") and obj["exc"].endswith("ValueError: boom")


def test_an_extra_field_cannot_replace_the_standard_keys() -> None:
    obj = json.loads(JsonFormatter("gateway").format(record("hi", extra={"role": "evil", "level": "x"})))
    assert (obj["role"], obj["level"]) == ("gateway", "INFO")


@pytest.fixture
def clean_root() -> Iterator[None]:
    """setup_logging changes the process's root logger: put it back for the other tests."""
    names = ("", "modelfleet", *THIRD_PARTY)
    levels = {n: logging.getLogger(n).level for n in names}
    handlers = logging.getLogger().handlers[:]
    yield
    root = logging.getLogger()
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def test_setup_quiets_third_party_at_info_and_not_at_debug(clean_root: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELFLEET_LOG_FORMAT", raising=False)
    monkeypatch.delenv("MODELFLEET_LOG_LEVEL", raising=False)
    buf = io.StringIO()
    assert setup_logging("gateway", "info", "json", stream=buf) == "json"
    logging.getLogger("httpx").info('HTTP Request: GET http://127.0.0.1:8100/v1/cluster/instances "200 OK"')
    logging.getLogger("uvicorn.error").info("Uvicorn running")
    logging.getLogger("httpx").warning("a warning still shows")
    logging.getLogger("modelfleet.gateway").info("state change", extra={"model": "m"})
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [(o["component"], o["message"]) for o in lines] == [
        ("httpx", "a warning still shows"),
        ("modelfleet.gateway", "state change"),
    ]
    # Children (gateway processes, runners) inherit the choice.
    assert os.environ["MODELFLEET_LOG_FORMAT"] == "json" and os.environ["MODELFLEET_LOG_LEVEL"] == "INFO"

    buf = io.StringIO()
    setup_logging("gateway", "debug", "text", stream=buf)  # replaces the first handler
    logging.getLogger("httpx").info("HTTP Request: GET http://x")
    assert buf.getvalue().count("\n") == 1 and "INFO httpx: HTTP Request: GET http://x" in buf.getvalue()
    assert sum(1 for h in logging.getLogger().handlers if isinstance(h.formatter, TextFormatter | JsonFormatter)) == 1


def test_bad_level_or_format_is_refused(clean_root: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELFLEET_LOG_FORMAT", raising=False)
    with pytest.raises(ValueError, match="log format must be one of text, json"):
        resolve_format("xml")
    with pytest.raises(ValueError, match="log level"):
        setup_logging("gateway", "loud", "text", stream=io.StringIO())
    monkeypatch.setenv("MODELFLEET_LOG_FORMAT", "JSON")
    assert resolve_format(None) == "json"


def test_cli_refuses_an_unknown_log_format() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "modelfleet.cli", "controller", "--log-format", "xml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "log format must be one of text, json" in r.stderr, r.stderr


def test_request_ids_are_validated_or_made() -> None:
    for ok in ("abc", "0f" * 16, "svc:1234/5", "a.b_c-d+e=f@g", "x" * 128):
        assert valid_request_id(ok) == ok and valid_request_id(ok.encode()) == ok
    for bad in ("", "x" * 129, "has space", "new\nline", 'quote"', "semi;colon", "é", b"\xff", None):
        assert valid_request_id(bad) is None, bad
    a, b = new_request_id(), new_request_id()
    assert a != b and re.fullmatch(r"[0-9a-f]{32}", a)
    assert request_id_of([(b"host", b"x"), (b"x-request-id", b"mine")]) == "mine"
    assert re.fullmatch(r"[0-9a-f]{32}", request_id_of([(b"x-request-id", b"not mine!")]))
    assert re.fullmatch(r"[0-9a-f]{32}", request_id_of([]))


def test_access_line_fields_and_text() -> None:
    rec = RequestRecord("rid-1")
    rec.model, rec.instance, rec.status, rec.attempts, rec.ttfb_s = "m", "w1/a", 200, 2, 0.0123
    rec.prompt_tokens, rec.completion_tokens = 5, 7
    f = access_fields(rec, "POST", "/v1/chat/completions", 0.5)
    assert f == {
        "request_id": "rid-1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "m",
        "instance": "w1/a",
        "status": 200,
        "attempts": 2,
        "ttfb_ms": 12.3,
        "duration_ms": 500.0,
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "client_disconnected": False,
    }
    assert rec.upstream_header == b"X-Request-ID: rid-1\r\n"
    assert access_message(f) == (
        "POST /v1/chat/completions request_id=rid-1 model=m instance=w1/a status=200 "
        "attempts=2 ttfb_ms=12.3 duration_ms=500.0 prompt_tokens=5 completion_tokens=7 "
        "client_disconnected=false"
    )
    # A client that left before any answer: 499 and client_disconnected.
    gone = access_fields(RequestRecord("rid-2"), "POST", "/v1/embeddings", 0.1)
    assert (gone["status"], gone["client_disconnected"], gone["ttfb_ms"]) == (499, True, None)
    assert "model=- instance=- status=499" in access_message(gone)


def test_up_prints_each_model_state_change_once() -> None:
    names = ["chat", "emb"]
    watch: dict[str, ModelWatch] = {}
    assert model_lines(names, watch, [], 0.1) == ["model chat: pending", "model emb: pending"]
    assert model_lines(names, watch, [], 0.6) == []  # nothing changed, nothing printed
    dl = {"model": "chat", "state": "downloading", "download": {"done": 10 << 20, "total": 100 << 20}}
    assert model_lines(names, watch, [dl], 1.0) == ["model chat: downloading (10% of 100.0 MiB)"]
    dl["download"] = {"done": 20 << 20, "total": 100 << 20}
    assert model_lines(names, watch, [dl], 1.5) == []  # progress by quarters, not every poll
    dl["download"] = {"done": 60 << 20, "total": 100 << 20}
    assert model_lines(names, watch, [dl], 2.0) == ["model chat: downloading (60% of 100.0 MiB)"]
    starting = [
        {"model": "chat", "state": "starting", "backend": "llama.cpp", "worker_id": "local"},
        {"model": "emb", "state": "starting", "backend": "sentence-transformers", "worker_id": "local"},
        {"model": "other", "state": "failed", "last_error": "not ours"},
    ]
    assert model_lines(names, watch, starting, 3.0) == [
        "model chat: loading (llama.cpp on worker local)",
        "model emb: loading (sentence-transformers on worker local)",
    ]
    # The best instance counts: one ready replica makes the model ready.
    ready = [
        {"model": "chat", "state": "ready"},
        {"model": "chat", "state": "starting"},
        {"model": "emb", "state": "failed", "last_error": "out of memory\ntraceback…"},
    ]
    assert model_lines(names, watch, ready, 12.34) == [
        "model chat: ready in 12.3 s",
        "model emb: failed: out of memory",
    ]
    assert model_lines(names, watch, ready, 13.0) == []  # a failure is said once
    # A model that loaded between two polls (pending, then ready) still shows its loading step.
    fast: dict[str, ModelWatch] = {}
    assert model_lines(["chat"], fast, [], 0.1) == ["model chat: pending"]
    quick = [{"model": "chat", "state": "ready", "backend": "llama.cpp", "worker_id": "local"}]
    assert model_lines(["chat"], fast, quick, 0.9) == [
        "model chat: loading (llama.cpp on worker local)",
        "model chat: ready in 0.9 s",
    ]


def test_gateway_settings_read_access_log_and_format_from_the_environment() -> None:
    from modelfleet.gateway.__main__ import parse
    from modelfleet.gateway.settings import GatewaySettings

    s = GatewaySettings.from_env({"MODELFLEET_ACCESS_LOG": "true", "MODELFLEET_LOG_FORMAT": "json"}, snapshot_path="")
    assert (s.access_log, s.log_format) == (True, "json")
    assert GatewaySettings.from_env({"MODELFLEET_ACCESS_LOG": "0"}, snapshot_path="").access_log is False
    assert GatewaySettings.from_env({}, snapshot_path="").access_log is False  # off unless asked
    with pytest.raises(ValueError, match="not a boolean"):
        GatewaySettings.from_env({"MODELFLEET_ACCESS_LOG": "maybe"}, snapshot_path="")
    with pytest.raises(ValueError, match="log_format must be text or json"):
        GatewaySettings(log_format="xml", snapshot_path="")
    assert parse(["--access-log", "--snapshot-path", ""]).access_log is True
    assert parse(["--no-access-log", "--snapshot-path", ""]).access_log is False
