"""What each backend turns a spec into (pure: command lines, environment, declared needs,
refusals). The runners themselves are exercised over HTTP in test_runner_*.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from modelfleet.bundled import BUNDLED
from modelfleet.models import InstanceSpec
from modelfleet.worker.runners import LaunchError, prepare_launch, uses_process
from modelfleet.worker.runners.backend_openai import base_url


def spec(backend: str, source: str, model: str = "m", **params: object) -> InstanceSpec:
    return InstanceSpec(id=f"w/{model}", model=model, backend=backend, source=source, params=params)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_llama_cpp_python_command_line() -> None:
    s = spec("llama-cpp-python", "smollm2-135m-instruct", model="chat", n_ctx=4096, n_threads=3, n_gpu_layers=-1,
             flash_attn=True, tensor_split=[0.5, 0.5], chat_template_kwargs={"x": 1}, gpus=[1, 2],
             memory=1000, gpu_memory=2000, args=["--seed", 7])
    launch = prepare_launch(s, "0.0.0.0", 30001)
    argv = launch.argv
    # llama-cpp-python's server, through our wrapper that logs request ids (llama_cpp_server.py).
    assert argv[:3] == [sys.executable, "-m", "modelfleet.worker.runners.llama_cpp_server"]
    assert flag(argv, "--model") == str(BUNDLED["smollm2-135m-instruct"].path())
    assert flag(argv, "--model_alias") == "chat"  # clients send the instance's model name
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("0.0.0.0", "30001")
    assert (flag(argv, "--n_ctx"), flag(argv, "--n_threads"), flag(argv, "--n_gpu_layers")) == ("4096", "3", "-1")
    assert flag(argv, "--interrupt_requests") == "false"
    assert flag(argv, "--n_threads_batch") == "3"  # follows n_threads unless given
    assert flag(argv, "--flash_attn") == "true"
    i = argv.index("--tensor_split")
    assert argv[i + 1 : i + 3] == ["0.5", "0.5"]
    assert flag(argv, "--chat_template_kwargs") == '{"x": 1}'
    assert argv[-2:] == ["--seed", "7"]
    assert "--gpus" not in argv and "--memory" not in argv  # ours, not the server's
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert launch.env["HF_HUB_OFFLINE"] == "1"
    assert (launch.memory, launch.gpu_memory, launch.gpus) == (1000, 2000, [1, 2])
    assert (launch.ready_path, launch.live_path) == ("/v1/models", "/openapi.json")


def test_llama_cpp_python_defaults_and_estimates() -> None:
    launch = prepare_launch(spec("llama-cpp-python", "smollm2-135m-instruct"), "127.0.0.1", 30000)
    assert flag(launch.argv, "--n_ctx") == "2048" and flag(launch.argv, "--n_gpu_layers") == "0"
    # Undeclared memory: the weights' size on disk.
    assert launch.memory == BUNDLED["smollm2-135m-instruct"].path().stat().st_size
    assert "CUDA_VISIBLE_DEVICES" not in launch.env


@pytest.mark.parametrize(
    ("s", "message"),
    [
        (spec("llama.cpp", "/no/such/model.gguf"), "model path does not exist: /no/such/model.gguf"),
        (spec("llama-cpp-python", "/no/such/model.gguf"), "model path does not exist: /no/such/model.gguf"),
        (spec("llama-cpp-python", "smollm2-135m-instruct", parallel=2), "serves one request at a time"),
        (spec("llama-cpp-python", "smollm2-135m-instruct", parallel=2, n_parallel=3), "disagree"),
        (spec("llama-cpp-python", "smollm2-135m-instruct", n_ctx="lots"), "n_ctx must be an integer"),
        (spec("llama-cpp-python", "smollm2-135m-instruct", gpus="all"), "gpus must be a count or a list"),
        (spec("sentence-transformers", "all-minilm-l6-v2", n_ctx=5), "unknown parameter(s) n_ctx"),
        (spec("sentence-transformers", str(Path(__file__))), "not a folder"),
        (spec("transformers", str(Path(__file__).parent)), "has no config.json"),
        (spec("vllm", "/no/such/folder"), None),
        (spec("openai", "ftp://x"), "needs an http(s) URL"),
        (spec("mxnet", "x"), "unknown backend 'mxnet'"),
    ],
)
def test_refusals_name_the_problem(s: InstanceSpec, message: str | None) -> None:
    with pytest.raises(LaunchError) as err:
        prepare_launch(s, "127.0.0.1", 30000)
    if message is not None:
        assert message in str(err.value)


def test_llama_file_must_be_a_file(tmp_path: Path) -> None:
    for backend in ("llama.cpp", "llama-cpp-python"):
        with pytest.raises(LaunchError, match="not a file"):
            prepare_launch(spec(backend, str(tmp_path)), "127.0.0.1", 30000)


def test_sentence_transformers_command_line() -> None:
    launch = prepare_launch(spec("sentence-transformers", "all-minilm-l6-v2", model="emb", n_threads=2,
                                 batch_size=16), "127.0.0.1", 30002)
    argv = launch.argv
    assert argv[1:3] == ["-m", "modelfleet.worker.runners.embeddings_server"]
    assert flag(argv, "--model-path") == str(BUNDLED["all-minilm-l6-v2"].path())
    assert flag(argv, "--model-name") == "emb"
    assert (flag(argv, "--threads"), flag(argv, "--batch-size")) == ("2", "16")
    assert launch.env["OMP_NUM_THREADS"] == "2"
    assert launch.env["TRANSFORMERS_OFFLINE"] == "1"


def test_transformers_command_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    launch = prepare_launch(spec("transformers", str(tmp_path), n_parallel=2, dtype="bfloat16", device="cuda"),
                            "127.0.0.1", 30003)
    argv = launch.argv
    assert argv[1:3] == ["-m", "modelfleet.worker.runners.transformers_server"]
    assert (flag(argv, "--parallel"), flag(argv, "--dtype"), flag(argv, "--device")) == ("2", "bfloat16", "cuda")


def test_vllm_command_line_when_installed() -> None:
    import importlib.util

    s = spec("vllm", "meta-llama/Llama-3.2-1B-Instruct", model="l", n_ctx=8192, parallel=64,
             tensor_parallel_size=2, gpu_memory_utilization=0.8, enforce_eager=True)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(LaunchError) as err:
            prepare_launch(s, "127.0.0.1", 30004)
        assert str(err.value) == "backend vllm needs the vllm extra (pip install 'modelfleet[vllm]')"
        return
    argv = prepare_launch(s, "127.0.0.1", 30004).argv
    assert flag(argv, "--served-model-name") == "l" and flag(argv, "--max-model-len") == "8192"
    assert flag(argv, "--max-num-seqs") == "64" and "--enforce-eager" in argv


def test_vllm_runs_with_the_interpreter_named_by_modelfleet_vllm_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vllm image: the worker in its own venv, vLLM in the image's Python."""
    s = spec("vllm", "meta-llama/Llama-3.2-1B-Instruct", model="l")
    monkeypatch.setenv("MODELFLEET_VLLM_PYTHON", sys.executable)
    argv = prepare_launch(s, "127.0.0.1", 30004).argv
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    monkeypatch.setenv("MODELFLEET_VLLM_PYTHON", "/no/such/python3")
    with pytest.raises(LaunchError) as err:
        prepare_launch(s, "127.0.0.1", 30004)
    assert str(err.value) == "backend vllm: MODELFLEET_VLLM_PYTHON=/no/such/python3 is not an executable"


def test_openai_attach_is_a_url_not_a_process() -> None:
    assert not uses_process("openai") and uses_process("llama.cpp") and uses_process("llama-cpp-python")
    launch = prepare_launch(spec("openai", "http://10.0.0.7:8000/v1/"), "127.0.0.1", 0)
    assert launch.argv is None and launch.url == "http://10.0.0.7:8000"
    assert base_url("https://api.example.com") == "https://api.example.com"
    assert launch.ready_path == "/v1/models"
