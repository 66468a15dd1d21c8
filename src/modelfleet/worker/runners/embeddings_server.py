"""Our embeddings runner: a sentence-transformers model behind OpenAI's /v1/embeddings.

    python -m modelfleet.worker.runners.embeddings_server --model-path DIR --model-name NAME --port P

- POST /v1/embeddings: ``input`` a string or a list of strings; token arrays are refused
  with a 400 (the model's tokenizer is not OpenAI's, so their ids mean nothing here).
  ``encoding_format`` float (default) or base64 (little-endian float32 bytes, as OpenAI
  sends them). ``usage.prompt_tokens`` counts the model's own tokens, special tokens
  included, after truncation to its max sequence length: what the model actually read.
- GET /v1/models, GET /health.

The model loads before the port opens, so "answers HTTP" means "ready". Requests that
arrive together are encoded as one batch on one thread: on CPU a single batched
forward pass beats concurrent small ones that fight over the same cores.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
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

MAX_INPUTS = 2048  # OpenAI's own limit on inputs per request


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future[tuple[np.ndarray, list[int]]] = field(repr=False)


class Encoder:
    """Encodes texts with one model on one thread, merging concurrent requests into batches."""

    def __init__(self, model: Any, batch_size: int = 64) -> None:
        self.model = model
        self.batch_size = batch_size
        self.max_seq_length = int(getattr(model, "max_seq_length", 0) or 512)
        # sentence-transformers 6 renamed the method; keep working with the older name too.
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dimension = int(dim())
        # Models with a default prompt or a truncated dimension need encode()'s extra steps.
        self._direct = (getattr(model, "default_prompt_name", None) is None
                        and getattr(model, "truncate_dim", None) is None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None

    def encode_now(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Embeddings (float32, one row per text) and the token count of each text."""
        if not self._direct:
            vectors = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                        show_progress_bar=False)
            enc = self.model.tokenizer(texts, add_special_tokens=True, truncation=True,
                                       max_length=self.max_seq_length)
            return np.asarray(vectors, dtype=np.float32), [len(ids) for ids in enc["input_ids"]]
        import torch

        # The steps of SentenceTransformer.encode (longest first, batches, tokenize, forward)
        # without its per-call overhead (~2.5 ms, 10 % of a one-sentence MiniLM request on
        # CPU), and with one tokenization serving both the model and the usage count.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        counts = [0] * len(texts)
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = [texts[i] for i in idx]
            # sentence-transformers 6 renamed tokenize() to preprocess().
            features = self.model.preprocess(batch) if hasattr(self.model, "preprocess") else self.model.tokenize(batch)
            mask = features.get("attention_mask")
            lengths = (mask.sum(dim=1) if mask is not None else torch.full((len(idx),), features["input_ids"].shape[1]))
            features = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in features.items()}
            with torch.inference_mode():
                emb = self.model(features)["sentence_embedding"]
            out[idx] = emb.float().cpu().numpy()
            for i, n in zip(idx, lengths.tolist(), strict=True):
                counts[i] = int(n)
        return out, counts

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        assert self._queue is not None, "Encoder.start() was not awaited"
        fut: asyncio.Future[tuple[np.ndarray, list[int]]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(texts, fut))
        return await fut

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: _Job | None = None
        while True:
            jobs = [carry if carry is not None else await self._queue.get()]
            carry = None
            # Add what is already waiting, up to one batch: no added wait, and no giant batch
            # either (on CPU, per-text cost grows with the batch's padded length).
            n = len(jobs[0].texts)
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if n + len(job.texts) > self.batch_size:
                    carry = job
                    break
                jobs.append(job)
                n += len(job.texts)
            jobs = [j for j in jobs if not j.future.cancelled()]
            if not jobs:
                continue
            texts = [t for j in jobs for t in j.texts]
            try:
                vectors, counts = await loop.run_in_executor(self._executor, self.encode_now, texts)
            except Exception as exc:
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            start = 0
            for j in jobs:
                end = start + len(j.texts)
                if not j.future.done():
                    j.future.set_result((vectors[start:end], counts[start:end]))
                start = end


def parse_input(value: Any) -> list[str]:
    """OpenAI's ``input``: a string or a list of strings here; clear 400s for the rest."""
    token_msg = ("token arrays are not supported by this runner: its tokenizer is not OpenAI's, so token ids "
                 "would be misread; send the text instead")
    if isinstance(value, str):
        if not value:
            raise ApiError(400, "input must not be an empty string", param="input")
        return [value]
    if isinstance(value, list):
        if not value:
            raise ApiError(400, "input must not be an empty list", param="input")
        if all(isinstance(v, str) for v in value):
            if len(value) > MAX_INPUTS:
                raise ApiError(400, f"input has {len(value)} items; at most {MAX_INPUTS} per request", param="input")
            for i, v in enumerate(value):
                if not v:
                    raise ApiError(400, f"input[{i}] must not be an empty string", param="input")
            return list(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ApiError(400, token_msg, param="input", code="unsupported_input")
        if all(isinstance(v, list) for v in value):
            raise ApiError(400, token_msg, param="input", code="unsupported_input")
    if value is None:
        raise ApiError(400, "input is required", param="input")
    raise ApiError(400, "input must be a string or a list of strings", param="input")


def create_app(encoder: Encoder, name: str) -> Starlette:
    async def embeddings(request: Request) -> Response:
        body = await read_json_object(request)
        texts = parse_input(body.get("input"))
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
        dims = body.get("dimensions")
        if dims is not None and dims != encoder.dimension:
            raise ApiError(400, f"dimensions={dims!r} is not supported: model {name} has {encoder.dimension} "
                                "dimensions and cannot shorten them", param="dimensions")
        vectors, counts = await encoder.encode(texts)
        data: list[dict[str, Any]] = []
        for i, vec in enumerate(vectors):
            emb: Any = (base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii") if fmt == "base64" else vec)
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(counts)
        return json_response({"object": "list", "data": data, "model": name,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await encoder.start()
        try:
            yield
        finally:
            await encoder.stop()

    return build_app(name, [Route("/v1/embeddings", embeddings, methods=["POST"])], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    ap = runner_arg_parser("modelfleet embeddings runner (sentence-transformers)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    log = start_runner(args)
    t0 = time.monotonic()
    log.info("loading sentence-transformers model %s from %s (device %s)", args.model_name, args.model_path,
             args.device)
    import torch
    from sentence_transformers import SentenceTransformer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = SentenceTransformer(args.model_path, device=args.device, local_files_only=True)
    model.eval()
    encoder = Encoder(model, batch_size=args.batch_size)
    encoder.encode_now(["warm up"])  # first call pays one-off costs; pay them before "ready"
    log.info("loaded %s in %.1f s: %d dimensions, max %d tokens", args.model_name, time.monotonic() - t0,
             encoder.dimension, encoder.max_seq_length)
    serve(create_app(encoder, args.model_name), args.host, args.port)


if __name__ == "__main__":
    main()
