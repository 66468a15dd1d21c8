"""The bundled all-MiniLM-L6-v2 through our embeddings runner (sentence-transformers
backend), over real HTTP with the official openai client. One runner for the module."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import pytest_asyncio

from modelfleet.models import InstanceState
from modelfleet.worker.modelspec import parse_model_flag
from modelfleet.worker.supervisor import Supervisor
from tests.conftest import require_modules
from tests.runners.helpers import port_start, wait_for, wait_gone

require_modules("sentence_transformers", hint="pip install 'modelfleet[runners]'")

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(150)]

MODEL = "all-minilm-l6-v2"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def emb(tmp_path_factory: pytest.TempPathFactory):
    sup = Supervisor(log_dir=tmp_path_factory.mktemp("emb-logs"), port_start=port_start(), startup_timeout=120,
                     stop_grace=5)
    spec = parse_model_flag(MODEL, "w1").model_copy(update={"params": {"n_threads": 2}})
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.READY, 120, "ready")
    yield st.endpoint
    await sup.stop_all()
    assert wait_gone(st.pid, 5)  # type: ignore[arg-type]
    # Load progress is in the runner's log.
    logs = sup.logs(spec.id, 200)
    assert any("loading sentence-transformers model all-minilm-l6-v2" in line for line in logs), logs
    assert any("384 dimensions" in line for line in logs)


@pytest_asyncio.fixture(loop_scope="module")
async def client(emb: str):
    http = httpx.AsyncClient(trust_env=False, timeout=60)
    yield openai.AsyncOpenAI(base_url=f"{emb}/v1", api_key="unused", max_retries=0, http_client=http)
    await http.aclose()


async def test_single_input(client: openai.AsyncOpenAI) -> None:
    r = await client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert r.model == MODEL and r.object == "list"
    assert len(r.data) == 1 and r.data[0].index == 0
    vec = np.array(r.data[0].embedding)
    assert vec.shape == (384,)
    assert abs(np.linalg.norm(vec) - 1.0) < 1e-3  # the model normalizes
    assert r.usage.prompt_tokens == r.usage.total_tokens == 4  # [CLS] hello world [SEP]


async def test_list_input_keeps_order_and_meaning(client: openai.AsyncOpenAI) -> None:
    texts = ["The cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell sharply today."]
    r = await client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2]
    v = np.array([d.embedding for d in r.data])
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # similar sentences are closer
    single = await client.embeddings.create(model=MODEL, input=texts[2], encoding_format="float")
    assert np.allclose(single.data[0].embedding, v[2], atol=1e-5)  # batching does not change results
    assert r.usage.prompt_tokens > 3 * 3


async def test_base64_is_little_endian_float32(client: openai.AsyncOpenAI, emb: str) -> None:
    # The openai client asks for base64 by default and decodes it itself.
    r = await client.embeddings.create(model=MODEL, input=["alpha", "beta"])
    assert len(r.data[1].embedding) == 384
    async with httpx.AsyncClient(trust_env=False) as http:
        raw = (await http.post(f"{emb}/v1/embeddings",
                               json={"model": MODEL, "input": "alpha", "encoding_format": "base64"})).json()
        flt = (await http.post(f"{emb}/v1/embeddings", json={"model": MODEL, "input": "alpha"})).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, flt["data"][0]["embedding"], atol=1e-6)
    assert np.allclose(decoded, r.data[0].embedding, atol=1e-6)


async def test_token_arrays_are_refused_clearly(client: openai.AsyncOpenAI, emb: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.embeddings.create(model=MODEL, input=[[1, 2, 3]])
    assert "token arrays are not supported" in str(err.value)
    async with httpx.AsyncClient(trust_env=False) as http:
        r = await http.post(f"{emb}/v1/embeddings", json={"model": MODEL, "input": [101, 102]})
        assert r.status_code == 400
        assert r.json()["error"] == {
            "message": r.json()["error"]["message"], "type": "invalid_request_error", "param": "input",
            "code": "unsupported_input"}
        for body, param in [({"input": ""}, "input"), ({"input": []}, "input"), ({}, "input"),
                            ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                            ({"input": "x", "dimensions": 64}, "dimensions")]:
            r = await http.post(f"{emb}/v1/embeddings", json={"model": MODEL, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        r = await http.post(f"{emb}/v1/embeddings", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = await http.get(f"{emb}/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


async def test_models_and_health(client: openai.AsyncOpenAI, emb: str) -> None:
    assert [m.id for m in (await client.models.list()).data] == [MODEL]
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.get(f"{emb}/health")).json()["status"] == "ok"
