"""The llama.cpp backend's command line for llama-server, where it finds the binary, and
the pure parsing of llama-server's /metrics and /slots (no process, no socket)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelfleet.bundled import BUNDLED
from modelfleet.models import InstanceSpec
from modelfleet.worker.runners import LaunchError, prepare_launch
from modelfleet.worker.runners import backend_llama_server as ls
from modelfleet.worker.slots import Target, parse_metrics, summarize
from modelfleet.worker.supervisor import _restart_key

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def fake_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv(ls.BINARY_ENV, str(binary))
    return binary


def spec(max_concurrency: int = 4, **params: object) -> InstanceSpec:
    return InstanceSpec(
        id="w/chat", model="chat", backend="llama.cpp", source=MODEL, max_concurrency=max_concurrency, params=params
    )


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_slots_follow_max_concurrency_and_context_is_per_slot(fake_binary: Path) -> None:
    launch = prepare_launch(spec(max_concurrency=8, n_ctx=1024, n_threads=2), "0.0.0.0", 30001)
    argv = launch.argv
    assert argv[0] == str(fake_binary)
    assert flag(argv, "--model") == str(BUNDLED[MODEL].path())
    assert flag(argv, "--alias") == "chat"  # clients send the instance's model name
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("0.0.0.0", "30001")
    assert flag(argv, "--parallel") == "8"
    assert flag(argv, "--ctx-size") == str(1024 * 8)  # each slot gets n_ctx
    assert (flag(argv, "--threads"), flag(argv, "--threads-batch")) == ("2", "2")
    assert {"--cont-batching", "--metrics", "--slots"} <= set(argv)
    assert flag(argv, "--cache-reuse") == "256"
    assert launch.slots == 8
    assert (launch.ready_path, launch.live_path) == ("/health", "/health")
    assert launch.memory == BUNDLED[MODEL].path().stat().st_size


def test_parallel_param_wins_and_flags_pass_through(fake_binary: Path) -> None:
    launch = prepare_launch(
        spec(
            max_concurrency=4,
            parallel=2,
            flash_attn=True,
            cache_prompt=False,
            cont_batching=False,
            cache_reuse=64,
            cache_ram=256,
            slot_prompt_similarity=0.5,
            tensor_split=[0.5, 0.5],
            embedding=True,
            gpus=[1],
            args=["--seed", 7],
        ),
        "127.0.0.1",
        30002,
    )
    argv = launch.argv
    assert flag(argv, "--parallel") == "2" and launch.slots == 2
    assert flag(argv, "--ctx-size") == str(ls.DEFAULT_N_CTX * 2)
    assert flag(argv, "--flash-attn") == "on"
    assert "--no-cache-prompt" in argv and "--no-cont-batching" in argv and "--cont-batching" not in argv
    assert flag(argv, "--cache-reuse") == "64" and argv.count("--cache-reuse") == 1
    assert flag(argv, "--cache-ram") == "256" and flag(argv, "--slot-prompt-similarity") == "0.5"
    assert flag(argv, "--tensor-split") == "0.5,0.5"
    assert "--embeddings" in argv
    assert argv[-2:] == ["--seed", "7"]
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_ctx": "lots"}, "n_ctx must be an integer"),
        ({"n_ctx": 8}, "at least 16"),
        ({"parallel": 0}, "parallel must be at least 1"),
        ({"parallel": 2, "n_parallel": 3}, "disagree"),
        ({"interrupt_requests": False}, "unknown parameter(s) interrupt_requests"),
        ({"jinja": "maybe"}, "jinja must be true or false"),
    ],
)
def test_refusals(fake_binary: Path, params: dict[str, object], message: str) -> None:
    with pytest.raises(LaunchError) as err:
        prepare_launch(spec(**params), "127.0.0.1", 30000)
    assert message in str(err.value)


def test_missing_binary_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ls.BINARY_ENV, str(tmp_path / "nothing"))
    with pytest.raises(LaunchError) as err:
        prepare_launch(spec(), "127.0.0.1", 30000)
    assert "needs llama.cpp's llama-server" in str(err.value)
    assert "scripts/build_llama_server.sh" in str(err.value) and "llama-cpp-python" in str(err.value)


def test_binary_is_found_in_the_build_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ls.BINARY_ENV, raising=False)
    monkeypatch.setenv(ls.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert ls.find_binary() is None or ls.find_binary().parent == Path(os.sys.executable).parent
    built = tmp_path / ls.LLAMA_VERSION / "llama-server"
    built.parent.mkdir()
    built.write_text("#!/bin/sh\n")
    built.chmod(0o755)
    if not (Path(os.sys.executable).parent / "llama-server").exists():
        assert ls.find_binary() == built


def test_new_max_concurrency_restarts_llama_server_only_when_it_sets_the_slots() -> None:
    assert _restart_key(spec(max_concurrency=4)) != _restart_key(spec(max_concurrency=8))
    assert _restart_key(spec(4, parallel=2)) == _restart_key(spec(8, parallel=2))
    other = InstanceSpec(id="w/e", model="e", backend="sentence-transformers", source="all-minilm-l6-v2")
    assert _restart_key(other) == _restart_key(other.model_copy(update={"max_concurrency": 9}))


METRICS = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 300
llamacpp:prompt_tokens_cached_total 100
llamacpp:tokens_predicted_total 64
llamacpp:requests_processing 2
llamacpp:requests_deferred 3
llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 5
llamacpp:n_busy_slots_per_decode nan
llamacpp:broken
other_metric 7
"""


def test_parse_metrics_keeps_plain_llamacpp_samples() -> None:
    m = parse_metrics(METRICS)
    assert m == {
        "prompt_tokens_total": 300.0,
        "prompt_tokens_cached_total": 100.0,
        "tokens_predicted_total": 64.0,
        "requests_processing": 2.0,
        "requests_deferred": 3.0,
    }


def test_summarize_counts_busy_slots_queue_and_cache_reuse() -> None:
    slots = [{"id": i, "is_processing": i < 2} for i in range(8)]
    r = summarize(Target("w/chat", "http://x", 8), slots, parse_metrics(METRICS))
    assert (r.instance, r.slots, r.busy, r.queue) == ("w/chat", 8, 2, 3)
    assert (r.prompt_tokens, r.prompt_tokens_cached, r.generated_tokens) == (300, 100, 64)
    assert r.cache_reuse == 0.25


def test_summarize_survives_odd_answers() -> None:
    r = summarize(Target("w/chat", "http://x", 4), {"error": "no slots"}, {"requests_processing": -1})
    assert (r.slots, r.busy, r.queue, r.cache_reuse) == (4, 0, 0, None)
