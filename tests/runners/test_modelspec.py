"""``--model NAME[=BACKEND:SOURCE]`` parsing (pure)."""

from __future__ import annotations

import os

import pytest

from modelfleet.worker.modelspec import parse_model_flag


def test_bundled_names_need_nothing_more() -> None:
    s = parse_model_flag("smollm2-135m-instruct", "w1")
    assert (s.id, s.model, s.backend, s.source, s.worker_id, s.deployment) == (
        "w1/smollm2-135m-instruct", "smollm2-135m-instruct", "llama.cpp", "smollm2-135m-instruct", "w1", None)
    e = parse_model_flag("all-minilm-l6-v2", "w1")
    assert (e.backend, e.source) == ("sentence-transformers", "all-minilm-l6-v2")
    assert parse_model_flag("smollm2-135m-instruct=llama.cpp", "w1").source == "smollm2-135m-instruct"
    assert parse_model_flag("smollm2-135m-instruct=llama-cpp-python", "w1").source == "smollm2-135m-instruct"


def test_backend_and_path() -> None:
    s = parse_model_flag("qwen=llama.cpp:/models/qwen.gguf", "gpu-1")
    assert (s.id, s.model, s.backend, s.source) == ("gpu-1/qwen", "qwen", "llama.cpp", "/models/qwen.gguf")
    rel = parse_model_flag("tiny=transformers:models/tiny", "w")
    assert rel.source == os.path.abspath("models/tiny")
    home = parse_model_flag("m=sentence-transformers:~/m", "w")
    assert home.source == os.path.expanduser("~/m")


def test_openai_url_keeps_its_colons() -> None:
    s = parse_model_flag("remote=openai:http://10.0.0.7:8000/v1/", "w")
    assert (s.backend, s.source) == ("openai", "http://10.0.0.7:8000/v1")


def test_vllm_repo_id_is_not_a_path() -> None:
    assert parse_model_flag("l=vllm:meta-llama/Llama-3.2-1B", "w").source == "meta-llama/Llama-3.2-1B"
    assert parse_model_flag("l=vllm:/m/llama", "w").source == "/m/llama"


def test_remote_sources_are_kept_and_spelled_canonically() -> None:
    """Remote sources are not paths: the worker downloads them into its cache before starting the runner."""
    s = parse_model_flag("qwen=llama.cpp:hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF:q4_k_m", "w")
    assert (s.backend, s.source) == ("llama.cpp", "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M@main")
    e = parse_model_flag("e=sentence-transformers:modelscope://org/minilm@v1", "w")
    assert e.source == "modelscope://org/minilm@v1"
    u = parse_model_flag(f"u=llama.cpp:https://host/m.gguf#sha256={'A' * 64}", "w")
    assert u.source == f"https://host/m.gguf#sha256={'a' * 64}"


def test_catalog_names_need_nothing_more() -> None:
    s = parse_model_flag("qwen2.5-0.5b-instruct", "w")
    assert (s.model, s.backend, s.source) == ("qwen2.5-0.5b-instruct", "llama.cpp",
                                              "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M@main")
    assert s.params == {"n_ctx": 4096}  # the catalog's defaults


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("mystery", "is neither a bundled model nor in the catalog"),
        ("x=llama.cpp:hf://org", r"expected hf://ORG/REPO"),
        ("x=llama.cpp:hf://org/repo:Q4_K_M/file.gguf", "a file or a quantization, not both"),
        ("x=llama.cpp:ftp://host/m.gguf", "unknown source scheme ftp://"),
        ("x=tensorrt:/m", "unknown backend 'tensorrt'"),
        ("x=llama.cpp", "missing source"),
        ("x=llama.cpp:", "missing source"),
        ("=llama.cpp:/m", "model name is empty"),
        ("bad name=llama.cpp:/m", "invalid model name"),
        ("x=openai:10.0.0.7:8000", r"needs an http\(s\) URL"),
    ],
)
def test_errors_say_what_is_wrong(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_model_flag(value, "w1")
