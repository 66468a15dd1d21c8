"""Fast checks of the image recipe and the compose file, with no container engine: the
Containerfile parsed and linted (hadolint is not available here), the slim image's roles
import no model library, and deploy/compose/compose.yaml wires what the HA layout needs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "docker" / "Containerfile"
COMPOSE = ROOT / "deploy" / "compose"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in CONTAINERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Containerfile ends inside a continued line"
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, rest in instructions():
        if word == "FROM":
            m = re.fullmatch(r"(\S+) AS (\S+)", rest, re.I)
            assert m, f"every stage is named: FROM {rest}"
            current = result.setdefault(m.group(2), [])
        assert current is not None or word in ("ARG",), f"{word} before the first FROM"
        if current is not None:
            current.append((word, rest))
    return result


def test_containerfile_parses_and_follows_the_rules() -> None:
    known = {
        "FROM",
        "ARG",
        "RUN",
        "COPY",
        "ENV",
        "USER",
        "WORKDIR",
        "EXPOSE",
        "ENTRYPOINT",
        "CMD",
        "LABEL",
        "STOPSIGNAL",
        "HEALTHCHECK",
    }
    ins = instructions()
    assert {w for w, _ in ins} <= known, {w for w, _ in ins} - known
    global_args = {}
    for word, rest in ins:
        if word == "FROM":
            break
        name, _, default = rest.partition("=")
        global_args[name] = default
    # Base images are build arguments with pinned defaults (never :latest, always a tag).
    assert set(global_args) == {"BASE_IMAGE", "VLLM_IMAGE"}
    for default in global_args.values():
        assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:[\w.-]+", default) and not default.endswith(":latest"), default
    st = stages()
    assert {"slim", "cpu", "vllm"} <= set(st)
    for name, body in st.items():
        base = body[0][1].split()[0]
        assert base in (*(f"${{{a}}}" for a in global_args), *st), f"stage {name} from {base}"
        for word, rest in body:
            if word == "COPY" and "--from=" in rest:
                assert rest.split("--from=")[1].split()[0] in st, rest
            if word == "RUN" and "apt-get install" in rest:
                assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists/*" in rest, rest
            if word == "RUN":
                assert not re.search(r"\bcurl\b[^|;&]*\|\s*(ba)?sh", rest), "no curl | sh"
            assert word != "ADD", "COPY, not ADD"
    for final in ("slim", "cpu", "vllm"):
        words = dict(st[final])
        assert words["USER"] == "10001:10001", final  # numeric: runAsNonRoot can verify it
        assert words["ENTRYPOINT"].startswith('["/usr/bin/tini", "--"'), final  # exec form, tini as PID 1
        assert any(w == "RUN" and "curl" in r for w, r in st[final] + st["runtime"] + st.get("vllm-python", [])), final


def test_controller_and_gateway_roles_import_no_model_library() -> None:
    """The slim image has no torch or llama.cpp: the roles it runs must not import them."""
    code = (
        "import sys; import modelfleet.cli; import modelfleet.controller.api; import modelfleet.gateway.app; "
        "import modelfleet.worker.agent; "
        "print(sorted(m for m in ('torch', 'llama_cpp', 'sentence_transformers', 'transformers', 'vllm') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_compose_file_wires_the_ha_layout_with_secrets_from_env() -> None:
    text = (COMPOSE / "compose.yaml").read_text()
    doc = yaml.safe_load(text)
    services = doc["services"]
    roles = {"postgres", "controller-1", "controller-2", "worker-1", "worker-2", "gateway-1", "gateway-2"}
    assert set(services) == roles
    assert "pgdata" in doc["volumes"] and "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    both = "http://controller-1:8100,http://controller-2:8100"
    for name, svc in services.items():
        env = svc.get("environment", {})
        if name.startswith(("worker", "gateway")):
            assert env["MODELFLEET_CONTROLLER"] == both, name
        if name.startswith("controller"):
            assert re.fullmatch(r"postgresql://modelfleet@postgres:5432/modelfleet", env["MODELFLEET_STORE"])
        for key, value in env.items():
            if re.search(r"TOKEN|PASSWORD", key):
                # Only from .env, and required: never a literal, never an empty default.
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), f"{name}: {key}={value}"
        if name != "postgres":
            assert svc["restart"] == "unless-stopped" and "healthcheck" in svc, name
    required = set(re.findall(r"\$\{([A-Z_0-9]+):\?", text))
    example = dict(
        line.split("=", 1)
        for line in (COMPOSE / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required <= set(example), required - set(example)
    assert all(v == "" for v in example.values()), "no value in .env.example"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(COMPOSE / ".env")], cwd=ROOT)
    assert ignored.returncode == 0, "deploy/compose/.env must be ignored by git"
