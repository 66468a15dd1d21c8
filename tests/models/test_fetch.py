"""Downloads into a worker's model cache, against the fake hub serving the bundled models'
real files: ``python -m modelfleet.worker.fetch`` as the worker runs it (a child process),
and the worker's DownloadManager that shares one download among instances.

Each scheme (hf://, modelscope://, https://) is killed half-way and resumed with a range
request, and refused when the bytes do not match the published checksum."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from modelfleet.worker.downloads import DownloadManager, FetchFailed
from modelfleet.worker.modelcache import ModelCache
from tests.fakes.hub import FakeHub, cached_blob
from tests.models.conftest import GGUF, MINILM_FILES, hub_env

pytestmark = pytest.mark.timeout(180)
GGUF_SHA = cached_blob(GGUF).sha256
SIZE = GGUF.stat().st_size


def fetch_cmd(cache: Path, source: str, backend: str | None = "llama.cpp") -> list[str]:
    argv = [sys.executable, "-m", "modelfleet.worker.fetch", "--cache", str(cache), "--source", source]
    return argv + (["--backend", backend] if backend else [])


def fetch(
    hub: FakeHub, cache: Path, source: str, backend: str | None = "llama.cpp", **env: str
) -> tuple[int, list[dict[str, Any]]]:
    p = subprocess.run(
        fetch_cmd(cache, source, backend), env=hub_env(hub, **env), capture_output=True, text=True, timeout=120
    )
    events = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert events, f"no events; stderr:\n{p.stderr[-3000:]}"
    return p.returncode, events


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def source_for(hub: FakeHub, scheme: str, repo: str) -> tuple[str, str]:
    """(source, the fake's stats key) for the bundled GGUF served under ``repo`` by ``scheme``."""
    if scheme == "hf":
        hub.add_hf(repo, {"smol.gguf": GGUF})
        return f"hf://{repo}/smol.gguf", f"hf:{repo}/smol.gguf"
    if scheme == "modelscope":
        hub.add_modelscope(repo, {"smol.gguf": GGUF})
        return f"modelscope://{repo}/smol.gguf", f"modelscope:{repo}/smol.gguf"
    name = repo.replace("/", "-") + ".gguf"
    hub.add_file(name, GGUF)
    return f"https://127.0.0.1:{hub.https_port}/files/{name}#sha256={GGUF_SHA}", f"files:{name}"


@pytest.mark.parametrize("scheme", ["hf", "modelscope", "https"])
def test_a_download_killed_half_way_resumes_from_its_partial_file(hub: FakeHub, tmp_path: Path, scheme: str) -> None:
    source, key = source_for(hub, scheme, f"org/resume-{scheme}")
    hub.throttle = 30e6  # ~3 s for the whole file: time to kill it half-way
    p = subprocess.Popen(fetch_cmd(tmp_path, source), env=hub_env(hub), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        for line in p.stdout:
            ev = json.loads(line)
            if ev["event"] == "progress" and ev["done"] > SIZE // 3:
                break
        p.kill()  # as abrupt as kill -9 of the worker (its child dies with it)
        p.wait(10)
    finally:
        hub.throttle = None
    partials = list(tmp_path.rglob("*.partial"))
    assert len(partials) == 1 and SIZE // 3 <= partials[0].stat().st_size < SIZE

    rc, events = fetch(hub, tmp_path, source)
    assert rc == 0, events
    plan, done = events[0], events[-1]
    assert plan["event"] == "plan" and plan["done"] >= SIZE // 3  # progress starts from what is on disk
    served = hub.served(key)
    assert served.downloads == 2
    resumed_at = int(served.ranges[1].removeprefix("bytes=").rstrip("-"))
    assert served.ranges[0] is None and resumed_at >= SIZE // 3, served.ranges
    assert done["event"] == "done" and done["downloaded"] == SIZE - resumed_at
    assert sha256_of(Path(done["path"])) == GGUF_SHA
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("*.partial.json"))


@pytest.mark.parametrize("scheme", ["hf", "modelscope", "https"])
def test_bytes_that_do_not_match_the_checksum_are_refused(hub: FakeHub, tmp_path: Path, scheme: str) -> None:
    if scheme == "https":
        hub.add_file("plain.gguf", GGUF)
        source = f"https://127.0.0.1:{hub.https_port}/files/plain.gguf#sha256={'0' * 64}"
    else:
        # A mirror gone bad: the listing publishes the real sha256, the bytes differ by one.
        add = hub.add_hf if scheme == "hf" else hub.add_modelscope
        add(f"org/bad-{scheme}", {"smol.gguf": GGUF}, corrupt=("smol.gguf",))
        source = f"{scheme}://org/bad-{scheme}/smol.gguf"
    rc, events = fetch(hub, tmp_path, source)
    assert rc == 2 and events[-1]["event"] == "error" and events[-1]["kind"] == "checksum"
    msg = events[-1]["message"]
    assert "checksum mismatch: expected sha256" in msg and "the download was deleted" in msg
    assert ("0" * 64 if scheme == "https" else GGUF_SHA) in msg
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".gguf", ".partial")]


def test_gated_and_private_repositories_say_what_is_missing(hub: FakeHub, tmp_path: Path) -> None:
    small = MINILM_FILES["config.json"]
    hub.add_hf("org/gated", {"m.gguf": small}, gated=True)
    rc, events = fetch(hub, tmp_path, "hf://org/gated/m.gguf")
    assert rc == 2 and events[-1]["kind"] == "gated"
    assert "gated repository (401" in events[-1]["message"] and "HF_TOKEN" in events[-1]["message"]
    rc, events = fetch(hub, tmp_path, "hf://org/gated/m.gguf", HF_TOKEN=hub.token)
    assert rc == 0 and Path(events[-1]["path"]).read_bytes() == small.read_bytes()

    hub.add_modelscope("org/private", {"m.gguf": small}, private=True)
    rc, events = fetch(hub, tmp_path, "modelscope://org/private/m.gguf")
    assert rc == 2 and events[-1]["kind"] == "auth"
    assert "access denied (401" in events[-1]["message"] and "MODELSCOPE_API_TOKEN" in events[-1]["message"]
    rc, events = fetch(hub, tmp_path, "modelscope://org/private/m.gguf", MODELSCOPE_API_TOKEN=hub.token)
    assert rc == 0, events

    rc, events = fetch(hub, tmp_path, "hf://org/no-such-repo/m.gguf")
    assert (
        rc == 2
        and events[-1]["kind"] == "not_found"
        and "repository org/no-such-repo not found" in events[-1]["message"]
    )
    rc, events = fetch(hub, tmp_path, f"https://127.0.0.1:{hub.https_port}/files/missing.gguf")
    assert rc == 2 and events[-1]["message"].endswith("file not found (404)")
    rc, events = fetch(hub, tmp_path, "hf://org/gated/m.gguf", HF_HUB_OFFLINE="1", HF_TOKEN=hub.token)
    assert rc == 0 and events[-1]["downloaded"] == 0  # offline, but complete in the cache already
    rc, events = fetch(hub, tmp_path / "empty", "hf://org/gated/m.gguf", HF_HUB_OFFLINE="1")
    assert rc == 2 and events[-1]["kind"] == "offline" and "HF_HUB_OFFLINE" in events[-1]["message"]


def test_a_repo_of_several_ggufs_needs_a_choice(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_hf("org/multi-GGUF", {"smol-q4_1.gguf": GGUF, "smol-q8_0.gguf": GGUF})
    rc, events = fetch(hub, tmp_path, "hf://org/multi-GGUF")
    assert rc == 2 and events[-1]["kind"] == "ambiguous"
    assert "smol-q4_1.gguf (93.8 MiB); smol-q8_0.gguf (93.8 MiB)" in events[-1]["message"]
    assert "--quant Q4_1" in events[-1]["message"]
    assert hub.downloads("hf:org/multi-GGUF/smol-q4_1.gguf") == 0


def test_not_enough_disk_is_said_before_downloading(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_hf("org/huge", {"huge.gguf": GGUF}, sizes={"huge.gguf": 1 << 50})
    rc, events = fetch(hub, tmp_path, "hf://org/huge/huge.gguf")
    assert rc == 2 and events[-1]["kind"] == "disk"
    assert "not enough disk space: 1048576.00 GiB to download" in events[-1]["message"]
    assert hub.downloads("hf:org/huge/huge.gguf") == 0


def test_a_snapshot_and_a_cache_listing_and_prune(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_modelscope("org/minilm", MINILM_FILES)
    rc, events = fetch(hub, tmp_path, "modelscope://org/minilm", backend="sentence-transformers")
    assert rc == 0, events
    folder = Path(events[-1]["path"])
    assert (folder / "1_Pooling" / "config.json").is_file() and (folder / "model.safetensors").stat().st_size > 1e7
    cache = ModelCache(tmp_path)
    assert cache.held() == ["modelscope://org/minilm@master"]
    kept = cache.prune(keep={"modelscope://org/minilm@master"})
    assert kept["removed"] == [] and folder.is_dir()
    gone = cache.prune(keep=set())
    assert gone["removed"] == ["modelscope://org/minilm@master"] and gone["freed"] > 9e7
    assert cache.held() == [] and not folder.exists()


async def test_two_instances_share_one_download_and_the_last_to_leave_stops_it(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in hub_env(hub).items():
        monkeypatch.setenv(k, v)
    hub.add_hf("org/shared", {"smol.gguf": GGUF})
    mgr = DownloadManager(tmp_path / "models", tmp_path / "logs")
    source = "hf://org/shared/smol.gguf"
    paths = await asyncio.gather(mgr.fetch(source, "llama.cpp", "i1"), mgr.fetch(source, "llama.cpp", "i2"))
    assert paths[0] == paths[1] and sha256_of(Path(paths[0])) == GGUF_SHA
    assert hub.downloads("hf:org/shared/smol.gguf") == 1
    assert mgr.held() == ["hf://org/shared/smol.gguf@main"]

    hub.add_hf("org/left", {"smol.gguf": GGUF})
    hub.throttle = 10e6
    try:
        waiting = asyncio.create_task(mgr.fetch("hf://org/left/smol.gguf", "llama.cpp", "i3"))
        deadline = time.monotonic() + 30
        while not [d for d in mgr.progress() if d.done > 0]:
            assert time.monotonic() < deadline, "no progress"
            await asyncio.sleep(0.1)
        (d,) = mgr.progress()
        assert d.instances == ["i3"] and d.state == "downloading" and d.total == SIZE
        waiting.cancel()  # the instance went away (undeployed)
        with pytest.raises(asyncio.CancelledError):
            await waiting
        deadline = time.monotonic() + 15
        while mgr.progress():
            assert time.monotonic() < deadline, "the download was not stopped"
            await asyncio.sleep(0.1)
    finally:
        hub.throttle = None
    (stopped,) = [d for d in mgr.recent() if d.source == "hf://org/left/smol.gguf@main"]
    assert stopped.state == "failed" and "no instance needs it" in (stopped.error or "")
    assert list((tmp_path / "models").rglob("*.partial"))  # kept for the next attempt to resume
    with pytest.raises(FetchFailed, match="bad repository"):
        await mgr.fetch("hf://org/not a repo", "llama.cpp", "i4")
