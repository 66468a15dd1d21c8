"""Fixtures for model-source tests: a fake hub (Hugging Face, ModelScope, plain HTTPS) serving
the bundled models' real files, and the environment a worker needs to reach it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from modelfleet.bundled import BUNDLED
from tests.fakes.hub import FakeHub, self_signed_cert

GGUF = BUNDLED["smollm2-135m-instruct"].path()
MINILM = BUNDLED["all-minilm-l6-v2"].path()
MINILM_FILES = {str(p.relative_to(MINILM)): p for p in sorted(MINILM.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    cert = self_signed_cert(tmp_path_factory.mktemp("tls"))
    h = FakeHub(cert=cert).start()
    yield h
    h.stop()


def hub_env(hub: FakeHub, **extra: str) -> dict[str, str]:
    """What a worker (or fetch process) needs to use the fake hub; no HF_HUB_OFFLINE, no token."""
    return hub.client_env(**extra)
