"""What the controller does with a deployment that names a remote source (prepare_deployment):
the canonical spelling, the size asked of the hub once, the backend a repository calls for, an
ambiguous GGUF repository refused, and a hub that cannot be reached costing only the size."""

from __future__ import annotations

import pytest

from modelfleet.catalog import load_catalog
from modelfleet.controller.models_api import prepare_deployment
from modelfleet.errors import ApiError
from modelfleet.models import DeploymentSpec
from tests.conftest import free_port
from tests.fakes.hub import FakeHub
from tests.models.conftest import GGUF, MINILM_FILES

SIZE = GGUF.stat().st_size


@pytest.fixture
def env(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    for k, v in hub.client_env().items():
        monkeypatch.setenv(k, v)
    return hub


async def test_the_hub_gives_size_and_backend(env: FakeHub) -> None:
    env.add_modelscope("org/dep-gguf", {"a-q4_1.gguf": GGUF, "a-q8_0.gguf": GGUF})
    env.add_modelscope("org/dep-minilm", MINILM_FILES)
    cat = load_catalog()
    d = await prepare_deployment(DeploymentSpec(name="a", source="modelscope://org/dep-gguf:q8_0"), cat, 5)
    assert (d.source, d.backend, d.model_bytes) == ("modelscope://org/dep-gguf:Q8_0@master", "llama.cpp", SIZE)
    assert d.model_bytes_from == "hub: 1 file(s), 93.8 MiB at master"
    e = await prepare_deployment(
        DeploymentSpec.model_validate({"name": "e", "source": "modelscope://org/dep-minilm"}), cat, 5
    )
    assert e.backend == "sentence-transformers"  # modules.json: no --backend needed
    assert (
        e.model_bytes
        == sum(p.stat().st_size for p in MINILM_FILES.values()) - MINILM_FILES[".gitattributes"].stat().st_size
    )
    with pytest.raises(ApiError) as err:
        await prepare_deployment(DeploymentSpec(name="x", source="modelscope://org/dep-gguf"), cat, 5)
    assert err.value.status == 400 and err.value.code == "ambiguous_source"
    assert "has 2 GGUF files: a-q4_1.gguf (93.8 MiB); a-q8_0.gguf (93.8 MiB)" in err.value.message
    with pytest.raises(ApiError, match="bad revision"):
        await prepare_deployment(DeploymentSpec(name="x", source="hf://org/repo@"), cat, 5)


async def test_an_unreachable_hub_costs_only_the_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    cat = load_catalog()
    d = await prepare_deployment(DeploymentSpec(name="a", source="modelscope://org/x/m.gguf"), cat, 2)
    assert d.model_bytes == 0 and d.model_bytes_from.startswith("unknown (the hub was not asked successfully")
    q = await prepare_deployment(DeploymentSpec(name="qwen2.5-0.5b-instruct-modelscope"), cat, 2)
    assert (q.model_bytes, q.backend) == (491_400_032, "llama.cpp")  # the catalog's figure
    assert q.model_bytes_from.startswith("catalog: 468.6 MiB (the hub was not asked successfully")
    attach = await prepare_deployment(DeploymentSpec(name="b", backend="openai", source="http://vllm:8000/v1"), cat, 2)
    assert attach.source == "http://vllm:8000/v1" and attach.model_bytes == 0  # an attached server: no lookup
