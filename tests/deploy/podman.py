"""podman for the container tests: whether it can run here, the images (built once per set of
inputs), and a compose project with unique names that is removed afterwards.

podman is set up as /work/shared/containers.md and docs/deploy.md say: runc and ulimits
within the hard limit, from deploy/podman/containers.conf (CONTAINERS_CONF)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
LOCAL_BASE = "localhost/modelfleet-debian-python:bookworm"
POSTGRES_DIR = Path(__file__).resolve().parent / "postgres-image"


def env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["podman", *args], capture_output=True, text=True, env=env(), timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p


def require_podman() -> None:
    """Fail in CI, skip elsewhere, with one line saying why podman cannot run containers."""
    why = None
    missing = [b for b in ("podman", "runc", "mmdebstrap", "podman-compose") if shutil.which(b) is None]
    if missing:
        why = f"{', '.join(missing)} not installed (scripts/deploy-deps.sh installs them as root)"
    elif os.geteuid() != 0:
        why = "not root: these tests run rootful podman"
    else:
        p = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
        if p.returncode != 0:
            why = f"podman does not work here: {(p.stderr.strip().splitlines() or ['?'])[-1]}"
    if why is None:
        return
    if IN_CI:
        pytest.fail(f"containers: {why} and CI=true", pytrace=False)
    pytest.skip(f"containers: {why}")


def build_images() -> dict[str, str]:
    """The modelfleet images (slim, cpu) via deploy/docker/build.sh, which rebuilds only when an
    input changed, and the PostgreSQL stand-in; returns their tags."""
    t0 = time.monotonic()
    p = subprocess.run(
        ["bash", str(ROOT / "deploy/docker/build.sh"), "all"],
        capture_output=True,
        text=True,
        env={**env(), "BASE_IMAGE": "debian-local"},
        timeout=1800,
        cwd=ROOT,
    )
    if p.returncode != 0:
        raise AssertionError(f"deploy/docker/build.sh failed:\n{p.stderr[-4000:]}")
    tags = dict(line.split("=", 1) for line in p.stdout.splitlines() if line.startswith("IMAGE_"))
    digest = hashlib.sha256()
    for f in sorted(POSTGRES_DIR.iterdir()):
        digest.update(f.name.encode() + f.read_bytes())
    digest.update(podman("image", "inspect", "--format", "{{.Id}}", LOCAL_BASE).stdout.encode())
    pg = f"localhost/modelfleet-test-postgres:{digest.hexdigest()[:12]}"
    if podman("image", "exists", pg, check=False).returncode != 0:
        podman("build", "-q", "--build-arg", f"BASE_IMAGE={LOCAL_BASE}", "-t", pg, str(POSTGRES_DIR), timeout=600)
    tags["IMAGE_POSTGRES"] = pg
    tags["build_s"] = f"{time.monotonic() - t0:.0f}"
    return tags


def image_size_mb(tag: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()) / 1e6


class ComposeProject:
    """deploy/compose/compose.yaml under a unique project name, with its own .env, in a temp dir."""

    def __init__(self, workdir: Path, dotenv: dict[str, str]) -> None:
        self.name = "mft" + uuid.uuid4().hex[:8]
        self.dir = workdir
        shutil.copy(ROOT / "deploy/compose/compose.yaml", workdir / "compose.yaml")
        (workdir / "models").mkdir(exist_ok=True)
        (workdir / ".env").write_text("".join(f"{k}={v}\n" for k, v in dotenv.items()))
        (workdir / ".env").chmod(0o600)
        self.log = workdir / "podman-compose.log"

    def compose(self, *args: str, timeout: float = 300) -> None:
        with open(self.log, "a") as log:
            p = subprocess.run(
                ["podman-compose", "-p", self.name, *args],
                cwd=self.dir,
                env=env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        if p.returncode != 0:
            raise AssertionError(
                f"podman-compose {' '.join(args)} failed; see {self.log}:\n" + self.log.read_text()[-3000:]
            )

    def container(self, service: str) -> str:
        return f"{self.name}_{service}_1"

    def inspect(self, service: str) -> dict[str, Any]:
        import json

        return json.loads(podman("inspect", self.container(service)).stdout)[0]

    def logs(self, service: str, lines: int = 40) -> str:
        p = podman("logs", "--tail", str(lines), self.container(service), check=False)
        return p.stdout + p.stderr

    def down(self) -> None:
        """Everything the project made: containers, pods, volumes, network."""
        label = f"label=io.podman.compose.project={self.name}"
        ids = podman("ps", "-aq", "--filter", label, check=False).stdout.split()
        if ids:
            podman("rm", "-f", "-t", "0", *ids, check=False)
        for pod in podman("pod", "ps", "-q", "--filter", f"name={self.name}", check=False).stdout.split():
            podman("pod", "rm", "-f", pod, check=False)
        vols = podman("volume", "ls", "-q", "--filter", label, check=False).stdout.split()
        vols += [v for v in podman("volume", "ls", "-q", check=False).stdout.split() if v.startswith(self.name + "_")]
        if vols:
            podman("volume", "rm", "-f", *sorted(set(vols)), check=False)
        for net in podman("network", "ls", "-q", "--filter", f"name={self.name}", check=False).stdout.split():
            podman("network", "rm", "-f", net, check=False)
