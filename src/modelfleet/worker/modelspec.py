"""The worker's ``--model NAME[=BACKEND:SOURCE]`` flag, turned into an InstanceSpec.

Examples::

    --model smollm2-135m-instruct                       # bundled: backend and file are known
    --model all-minilm-l6-v2
    --model qwen=llama.cpp:/models/qwen2.5-0.5b-q4.gguf
    --model minilm=sentence-transformers:/models/all-MiniLM-L6-v2
    --model tiny=transformers:~/models/tiny-llama
    --model llama3=vllm:meta-llama/Meta-Llama-3-8B-Instruct
    --model remote=openai:http://10.0.0.7:8000/v1      # attach: no process
    --model qwen=llama.cpp:hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M   # downloaded into the cache
    --model qwen2.5-0.5b-instruct                       # a catalog entry (modelfleet.catalog)

The value is split on the first ``=`` (name, rest) and the rest on the first ``:``
(backend, source): backend names never contain ``:``, while a URL source does.
Backend parameters (n_ctx, n_threads, …) are not part of the flag; they come from
deployments (``InstanceSpec.params``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from modelfleet.bundled import BUNDLED
from modelfleet.catalog import CatalogError, load_catalog
from modelfleet.models import InstanceSpec
from modelfleet.sources import GGUF_BACKENDS, SourceError, canonical_source, parse_source

# Same rule as Deployment.name, so a declared model can also be deployed under its name.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")

KNOWN_BACKENDS = ("llama.cpp", "llama-cpp-python", "sentence-transformers", "transformers", "vllm", "openai")
# Backends whose source is a local path (expanded and made absolute at parse time,
# because the runner's working directory is not the shell's).
_PATH_BACKENDS = ("llama.cpp", "llama-cpp-python", "sentence-transformers", "transformers")


def parse_model_flag(value: str, worker_id: str) -> InstanceSpec:
    """Parse one ``--model`` value; raise ValueError with a message fit for a CLI user."""
    value = value.strip()
    name, sep, rest = value.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"--model {value!r}: the model name is empty (expected NAME[=BACKEND:SOURCE])")
    if not _NAME_RE.match(name) or len(name) > 255:
        raise ValueError(
            f"--model {value!r}: invalid model name {name!r} "
            "(letters, digits and . _ : / -, starting with a letter or digit)"
        )
    bundled = BUNDLED.get(name)
    params: dict[str, object] = {}
    if not sep:
        if bundled is not None:
            backend, source = bundled.backend, bundled.name
        else:
            try:
                entry = load_catalog().get(name)
            except CatalogError as exc:
                raise ValueError(f"--model {value!r}: {exc}") from None
            if entry is None:
                raise ValueError(
                    f"--model {value!r}: {name!r} is neither a bundled model nor in the catalog "
                    f"(`modelfleet catalog` lists them); give it as {name}=BACKEND:SOURCE with BACKEND one of "
                    f"{', '.join(KNOWN_BACKENDS)}"
                )
            backend, source, params = entry.backend, canonical_source(entry.source), dict(entry.params)
    else:
        backend, _, source = rest.partition(":")
        backend, source = backend.strip(), source.strip()
        if backend not in KNOWN_BACKENDS:
            raise ValueError(
                f"--model {value!r}: unknown backend {backend!r} (known: {', '.join(KNOWN_BACKENDS)})"
            )
        if not source:
            # NAME=BACKEND is enough for a bundled model served by its own backend.
            # The bundled GGUF also runs on llama-cpp-python's server (backend llama-cpp-python).
            if bundled is not None and (bundled.backend == backend
                                        or {bundled.backend, backend} <= set(GGUF_BACKENDS)):
                source = bundled.name
            else:
                raise ValueError(f"--model {value!r}: missing source after {backend}: (a path or URL)")
        if backend == "openai":
            if not re.match(r"^https?://", source):
                raise ValueError(f"--model {value!r}: backend openai needs an http(s) URL, got {source!r}")
            source = source.rstrip("/")
        elif "://" in source:
            try:
                remote = parse_source(source)
            except SourceError as exc:
                raise ValueError(f"--model {value!r}: {exc}") from None
            assert remote is not None
            source = remote.canonical  # downloaded into the worker's model cache before the runner starts
        elif backend in _PATH_BACKENDS and source not in BUNDLED:
            source = os.path.abspath(os.path.expanduser(source))
        elif backend == "vllm" and (source.startswith(("/", ".", "~"))):
            # vLLM also takes a Hugging Face repo id; only things that look like paths are expanded.
            source = str(Path(source).expanduser().absolute())
    instance_id = f"{worker_id}/{name}"
    if len(instance_id) > 128:
        raise ValueError(f"--model {value!r}: instance id {instance_id!r} is longer than 128 characters")
    return InstanceSpec(
        id=instance_id,
        model=name,
        deployment=None,
        worker_id=worker_id,
        backend=backend,
        source=source,
        params=params,
    )
