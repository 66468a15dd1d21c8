"""Our transformers runner: a Hugging Face causal LM from a local folder behind OpenAI's
chat and completions APIs.

    python -m modelfleet.worker.runners.transformers_server --model-path DIR --model-name NAME --port P

- POST /v1/chat/completions: the tokenizer's chat template is applied; ``stream: true``
  answers Server-Sent Events (``data: {chunk}\\n\\n`` … ``data: [DONE]\\n\\n``) fed by a
  TextIteratorStreamer, with a usage chunk when ``stream_options.include_usage``.
- POST /v1/completions: a text prompt, same sampling fields.
- GET /v1/models, GET /health.

Sampling: ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0 means greedy),
``top_p``, ``seed``, ``stop`` (a string or up to 4). Refused with a 400: ``n`` > 1, token
arrays, ``logprobs``, ``tools``, ``echo``. Generations run ``--parallel`` at a time
(default 1: on CPU, concurrent generate() calls only share the same cores); the rest wait.
A client that disconnects stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from modelfleet.worker.runners.openai_http import (
    ApiError,
    build_app,
    json_response,
    read_json_object,
    runner_arg_parser,
    serve,
    start_runner,
)

DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for the legacy completions API


class StopTrimmer:
    """Cuts generated text at the first stop string, holding back a tail that could be the
    start of one, so a streamed client never sees any part of a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text safe to emit now."""
        if self.stopped:
            return ""
        self.buffer += text
        if self.stops:
            cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                out, self.buffer, self.stopped = self.buffer[:cut], "", True
                return out
        if self.hold <= 0:
            out, self.buffer = self.buffer, ""
            return out
        out, self.buffer = self.buffer[: -self.hold], self.buffer[-self.hold :]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


@dataclass
class GenRequest:
    input_ids: Any  # torch tensor [1, n]
    max_new_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stops: list[str]
    cancel: threading.Event = field(default_factory=threading.Event)
    output: Any = None
    error: BaseException | None = None


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Generator:
    """Runs generate() in threads, ``parallel`` at a time, streaming text out."""

    def __init__(self, model: Any, tokenizer: Any, parallel: int = 1) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.n_ctx = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.parallel = parallel
        self._sem: asyncio.Semaphore | None = None
        self._seed_lock = threading.Lock()

    @property
    def sem(self) -> asyncio.Semaphore:
        if self._sem is None:  # created on the server's loop
            self._sem = asyncio.Semaphore(self.parallel)
        return self._sem

    def _run(self, req: GenRequest, streamer: Any) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), req.cancel.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        kwargs: dict[str, Any] = {"max_new_tokens": req.max_new_tokens,
                                  "stopping_criteria": StoppingCriteriaList([Cancelled()])}
        if req.temperature > 0:
            kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p or 1.0, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        try:
            with torch.inference_mode():
                ids = req.input_ids.to(self.model.device)
                if req.seed is not None:
                    with self._seed_lock:
                        torch.manual_seed(req.seed)
                req.output = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                 streamer=streamer, pad_token_id=pad, **kwargs)
        except BaseException as exc:
            req.error = exc
            streamer.end()  # unblock the reader, which then raises req.error

    async def stream(self, req: GenRequest) -> AsyncIterator[str]:
        """Yields text pieces; finally sets req.output (all ids) or raises req.error."""
        from transformers import TextIteratorStreamer

        async with self.sem:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            thread = threading.Thread(target=self._run, args=(req, streamer), daemon=True, name="generate")
            thread.start()
            try:
                async for piece in iterate_in_threadpool(streamer):
                    if piece:
                        yield piece
            finally:
                # Client gone or stop string seen: the next token check ends generate().
                req.cancel.set()
                await asyncio.to_thread(thread.join)
            if req.error is not None:
                raise req.error

    def finish_reason(self, req: GenRequest, stopped_by_string: bool) -> tuple[str, int]:
        prompt_len = int(req.input_ids.shape[1])
        completion = int(req.output.shape[1]) - prompt_len if req.output is not None else 0
        if stopped_by_string:
            return "stop", completion
        last = int(req.output[0, -1]) if req.output is not None and completion > 0 else None
        eos = self.tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) - {None}
        if last is not None and last in eos_ids:
            return "stop", completion
        return ("length" if completion >= req.max_new_tokens else "stop"), completion


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise ApiError(400, f"{where}: only text content parts are supported by this runner", param=where)
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", param=where)


def _sampling(body: dict[str, Any], default_max: int, gen: Generator, n_prompt: int) -> dict[str, Any]:
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n > 1 is not supported by this runner", param="n")
    if body.get("logprobs"):
        raise ApiError(400, "logprobs are not supported by this runner", param="logprobs")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
    room = gen.n_ctx - n_prompt
    if room < 1:
        raise ApiError(400, f"the prompt has {n_prompt} tokens; this model's context is {gen.n_ctx}",
                       param="messages", code="context_length_exceeded")
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise ApiError(400, "temperature must be a number between 0 and 2", param="temperature")
    top_p = body.get("top_p")
    if top_p is not None and (not isinstance(top_p, int | float) or not 0 < top_p <= 1):
        raise ApiError(400, "top_p must be a number in (0, 1]", param="top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, "seed must be an integer", param="seed")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    return {"max_new_tokens": min(max_tokens or default_max, room), "temperature": float(temperature),
            "top_p": top_p, "seed": seed, "stops": stops}


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def create_app(gen: Generator, name: str) -> Starlette:
    import torch

    tok = gen.tokenizer

    def encode(text: str) -> Any:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], dtype=torch.long)

    async def run(req: GenRequest, stream: bool, make_chunk: Any, make_final: Any, include_usage: bool) -> Response:
        trimmer = StopTrimmer(req.stops)
        prompt_tokens = int(req.input_ids.shape[1])
        if not stream:
            pieces = []
            async for piece in gen.stream(req):
                pieces.append(trimmer.feed(piece))
                if trimmer.stopped:
                    req.cancel.set()  # ends generate() at the next token; the stream then ends
            pieces.append(trimmer.flush())
            reason, completion = gen.finish_reason(req, trimmer.stopped)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                     "total_tokens": prompt_tokens + completion}
            return json_response(make_final("".join(pieces), reason, usage))

        async def events() -> AsyncIterator[bytes]:
            yield _sse(make_chunk(None, None, first=True))
            try:
                async for piece in gen.stream(req):
                    out = trimmer.feed(piece)
                    if out:
                        yield _sse(make_chunk(out, None))
                    if trimmer.stopped:
                        req.cancel.set()
                rest = trimmer.flush()
                if rest:
                    yield _sse(make_chunk(rest, None))
                reason, completion = gen.finish_reason(req, trimmer.stopped)
                yield _sse(make_chunk(None, reason))
                if include_usage:
                    yield _sse(make_chunk(None, None, usage={
                        "prompt_tokens": prompt_tokens, "completion_tokens": completion,
                        "total_tokens": prompt_tokens + completion}))
            except Exception as exc:
                # Headers are gone already: the error travels as an event, as OpenAI does.
                yield _sse({"error": {"message": f"generation failed: {type(exc).__name__}: {exc}",
                                      "type": "server_error", "param": None, "code": None}})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def chat(request: Request) -> Response:
        body = await read_json_object(request)
        if body.get("tools") or body.get("functions"):
            raise ApiError(400, "tools are not supported by this runner", param="tools")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        conv = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
            conv.append({"role": m["role"], "content": _text_of(m.get("content"), f"messages[{i}].content")})
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, f"model {name} has no chat template; use /v1/completions", param="messages")
        text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        ids = encode(text)
        s = _sampling(body, DEFAULT_CHAT_MAX_TOKENS, gen, int(ids.shape[1]))
        req = GenRequest(input_ids=ids, **s)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(content: str | None, reason: str | None, first: bool = False, usage: Any = None) -> Any:
            base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name}
            if usage is not None:
                return {**base, "choices": [], "usage": usage}
            delta: dict[str, Any] = {}
            if first:
                delta = {"role": "assistant", "content": ""}
            elif content is not None:
                delta = {"content": content}
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        def final(text: str, reason: str, usage: Any) -> Any:
            return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": reason}], "usage": usage}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await run(req, bool(body.get("stream")), chunk, final, include_usage)

    async def completions(request: Request) -> Response:
        body = await read_json_object(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(p, int | list) for p in prompt):
            raise ApiError(400, "token arrays are not supported by this runner; send the prompt as text",
                           param="prompt", code="unsupported_input")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string (one prompt per request here)", param="prompt")
        if body.get("echo"):
            raise ApiError(400, "echo is not supported by this runner", param="echo")
        ids = encode(prompt)
        if ids.shape[1] == 0 and tok.bos_token_id is not None:
            ids = torch.tensor([[tok.bos_token_id]], dtype=torch.long)  # generation needs one token to start from
        s = _sampling(body, DEFAULT_COMPLETION_MAX_TOKENS, gen, int(ids.shape[1]))
        req = GenRequest(input_ids=ids, **s)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(content: str | None, reason: str | None, first: bool = False, usage: Any = None) -> Any:
            base = {"id": cid, "object": "text_completion", "created": created, "model": name}
            if usage is not None:
                return {**base, "choices": [], "usage": usage}
            return {**base, "choices": [{"index": 0, "text": content or "", "logprobs": None, "finish_reason": reason}]}

        def final(text: str, reason: str, usage: Any) -> Any:
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
                    "usage": usage}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await run(req, bool(body.get("stream")), chunk, final, include_usage)

    return build_app(name, [Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/completions", completions, methods=["POST"])])


def main(argv: list[str] | None = None) -> None:
    ap = runner_arg_parser("modelfleet transformers runner (causal LM)")
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=1, help="generations at a time")
    args = ap.parse_args(argv)
    log = start_runner(args)
    t0 = time.monotonic()
    log.info("loading transformers model %s from %s (device %s, dtype %s)", args.model_name, args.model_path,
             args.device, args.dtype)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype: Any = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if dtype == "auto" and args.device == "cpu":
        dtype = torch.float32  # half precision on CPU is slow or unsupported for many ops
    tokenizer = AutoTokenizer.from_pretrained(args.model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype, local_files_only=True)
    model.to(args.device)
    model.eval()
    gen = Generator(model, tokenizer, parallel=max(1, args.parallel))
    log.info("loaded %s in %.1f s: context %d tokens, %d parallel", args.model_name, time.monotonic() - t0,
             gen.n_ctx, gen.parallel)
    with contextlib.suppress(KeyboardInterrupt):
        serve(create_app(gen, args.model_name), args.host, args.port)


if __name__ == "__main__":
    main()
