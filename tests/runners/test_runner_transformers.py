"""Our transformers runner on a tiny Llama built here (random weights, a byte-level BPE
tokenizer trained on a few sentences, a chat template): nothing is downloaded. Over real
HTTP with the official openai client; one runner for the module."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio

from modelfleet.models import InstanceSpec, InstanceState
from modelfleet.worker.supervisor import Supervisor
from tests.conftest import require_modules
from tests.runners.helpers import port_start, wait_for, wait_gone

require_modules("transformers", "torch", hint="pip install 'modelfleet[runners]'")

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(150)]

MODEL = "tiny-llama"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model answers questions about the weather and the sea.",
    "Workers run models; the gateway routes requests to them.",
    "Hello! How are you today? I am fine, thank you.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]


def build_tiny_llama(path: Path) -> None:
    """A causal LM of a few thousand parameters, saved like any Hugging Face model folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tiny(tmp_path_factory: pytest.TempPathFactory):
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(model_dir)
    sup = Supervisor(log_dir=tmp_path_factory.mktemp("tf-logs"), port_start=port_start(), startup_timeout=120,
                     stop_grace=5)
    spec = InstanceSpec(id="w1/tiny", model=MODEL, backend="transformers", source=str(model_dir),
                        params={"n_threads": 1})
    await sup.apply([spec])
    st = await wait_for(sup, spec.id, lambda s: s.state == InstanceState.READY, 120, "ready")
    yield st.endpoint, model_dir
    await sup.stop_all()
    assert wait_gone(st.pid, 5)  # type: ignore[arg-type]
    assert any("loading transformers model tiny-llama" in line for line in sup.logs(spec.id, 200))


@pytest_asyncio.fixture(loop_scope="module")
async def client(tiny):
    http = httpx.AsyncClient(trust_env=False, timeout=60)
    yield openai.AsyncOpenAI(base_url=f"{tiny[0]}/v1", api_key="unused", max_retries=0, http_client=http)
    await http.aclose()


def prompt_tokens(model_dir: Path) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


async def test_chat(client: openai.AsyncOpenAI, tiny) -> None:
    r = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens == prompt_tokens(tiny[1])  # the chat template was applied
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL and r.id.startswith("chatcmpl-")


async def test_streaming_chat_matches_non_streaming(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content  # greedy: same tokens either way
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


async def test_raw_sse_ends_with_done(tiny) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=60) as http, http.stream(
        "POST", f"{tiny[0]}/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = (await r.aread()).decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


async def test_completions_and_stop(client: openai.AsyncOpenAI) -> None:
    r = await client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=16, temperature=0)
    text = r.choices[0].text
    assert r.object == "text_completion" and r.usage.completion_tokens <= 16
    streamed = "".join([c.choices[0].text async for c in await client.completions.create(
        model=MODEL, prompt="The quick brown", max_tokens=16, temperature=0, stream=True) if c.choices])
    assert streamed == text
    if len(text) >= 4:
        stop = text[2:4]
        cut = await client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=16, temperature=0,
                                              stop=[stop])
        assert cut.choices[0].text == text[: text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"


async def test_sampling_with_seed_is_repeatable(client: openai.AsyncOpenAI) -> None:
    a, b = [await client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=1.0, seed=7)
            for _ in range(2)]
    assert a.choices[0].text == b.choices[0].text


async def test_refusals_are_openai_errors(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    with pytest.raises(openai.BadRequestError, match="token arrays"):
        await client.completions.create(model=MODEL, prompt=[1, 2, 3])
    with pytest.raises(openai.BadRequestError, match="messages"):
        await client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="context"):
        await client.completions.create(model=MODEL, prompt="word " * 400)
    assert [m.id for m in (await client.models.list()).data] == [MODEL]
