"""Models by source on a real cluster: a controller, a gateway and workers (each with its own
model cache) against the fake hub. Deployments name hf://, modelscope:// and https://
sources; the workers that get replicas download them, verified, and serve them through the
gateway to the official openai client.

One cluster serves the module and the tests run in file order (the replacement test kills
the worker that holds a replica of the first test's deployment)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import free_port
from tests.fakes.hub import FakeHub, cached_blob
from tests.models.conftest import GGUF, MINILM_FILES, hub_env
from tests.runners.helpers import port_start
from tests.support.procs import MODELFLEET, Proc, Procs, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SIZE = GGUF.stat().st_size
SMOL = "hf://org/smol-GGUF:Q4_1@main"  # canonical
SMOL_KEY = "hf:org/smol-GGUF/smollm2-135m-instruct-q4_1.gguf"
LIGHT = ["--param", "n_threads=1", "--param", "n_ctx=512"]


@dataclass
class Fleet:
    ctl: str
    gateway: str
    home: Path
    procs: Procs
    env: dict[str, str]
    workers: dict[str, Proc] = field(default_factory=dict)

    def start_worker(self, name: str, *extra: str) -> Proc:
        port = free_port()
        p = self.procs.worker(
            name,
            port,
            self.ctl,
            "--heartbeat-interval",
            "1",
            "--runner-port-start",
            str(port_start()),
            "--models-dir",
            str(self.home / f"models-{name}"),
            *extra,
            env=self.env,
        )
        p.wait_ready(60)
        p.port = port  # type: ignore[attr-defined]
        self.workers[name] = p
        return p

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*MODELFLEET, *args, "--controller", self.ctl],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )

    def instances(self, model: str | None = None) -> list[dict[str, Any]]:
        params = {"model": model} if model else {}
        return httpx.get(f"{self.ctl}/v1/cluster/instances", params=params, timeout=10).json()["data"]

    def worker_record(self, name: str) -> dict[str, Any]:
        return httpx.get(f"{self.ctl}/v1/cluster/workers/{name}", timeout=10).json()

    def ready(self, model: str, n: int) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            insts = self.instances(model)
            failed = [i for i in insts if i["state"] == "failed"]
            assert not failed, f"{model} failed: {failed[0]['last_error']}"
            live = [i for i in insts if i["state"] == "ready" and i["worker_alive"]]
            return live if len(live) == n and len(insts) == n else None

        return wait_for(check, 120, interval=0.3, what=f"{n} ready replica(s) of {model}")

    def chat(self, model: str) -> str:
        client = openai.OpenAI(base_url=f"{self.gateway}/v1", api_key="none", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=model, max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
        return r.choices[0].message.content or ""


@pytest.fixture(scope="module")
def fleet(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("fleet")
    (home / "catalog.yaml").write_text(
        "models:\n"
        "  - name: tiny-chat\n"
        "    source: 'hf://org/smol-GGUF:Q4_1'\n"
        "    backend: llama.cpp\n"
        "    params: {n_ctx: 512, n_threads: 1}\n"
        "    size: 1 GiB\n"
        "    memory: 0.5 GiB\n"
    )
    procs = Procs(home)
    env = hub_env(hub, MODELFLEET_HOME=str(home / "home"))
    cport, gport = free_port(), free_port()
    ctl = f"http://127.0.0.1:{cport}"
    procs.controller(
        "ctl",
        cport,
        f"sqlite:///{home / 'state.db'}",
        "--heartbeat-interval",
        "1",
        "--grace",
        "3",
        "--catalog",
        str(home / "catalog.yaml"),
        env=env,
    )
    gateway = f"http://127.0.0.1:{gport}"
    procs.gateway("gateway", gport, ctl, home / "routes.json", env=env)
    f = Fleet(ctl=ctl, gateway=gateway, home=home, procs=procs, env=env)
    f.start_worker("w1")
    f.start_worker("w2")
    try:
        yield f
    finally:
        procs.stop_all()


def test_hf_repo_two_replicas_download_once_per_worker_and_serve(fleet: Fleet, hub: FakeHub) -> None:
    hub.add_hf("org/smol-GGUF", {"smollm2-135m-instruct-q4_1.gguf": GGUF, "smollm2-135m-instruct-q8_0.gguf": GGUF})
    r = fleet.cli("deploy", "smol", "--model", "hf://org/smol-GGUF", "--replicas", "2", *LIGHT)
    assert r.returncode == 1 and "has 2 GGUF files" in r.stderr and "--quant Q4_1" in r.stderr, r.stderr

    hub.throttle = 15e6  # ~6.5 s per download: the progress can be watched
    try:
        r = fleet.cli("deploy", "smol", "--model", "hf://org/smol-GGUF", "--quant", "Q4_1", "--replicas", "2", *LIGHT)
        assert r.returncode == 0, r.stderr
        assert f"llama.cpp {SMOL}, 2 replica(s); size 93.8 MiB (hub: 1 file(s), 93.8 MiB at" in " ".join(
            r.stdout.split()
        )
        downloading = wait_for(
            lambda: [
                i
                for i in fleet.instances("smol")
                if i["state"] == "downloading" and (i["download"] or {}).get("done", 0) > 0
            ],
            60,
            interval=0.2,
            what="a replica downloading with progress",
        )
        d = downloading[0]["download"]
        assert d["source"] == SMOL and d["total"] == SIZE and d["instances"] == [downloading[0]["id"]]
        table = fleet.cli("instances", "--model", "smol").stdout
        assert "downloading" in table and "% of 93.8 MiB" in table, table
    finally:
        hub.throttle = None
    ready = fleet.ready("smol", 2)
    assert sorted(i["worker_id"] for i in ready) == ["w1", "w2"]
    assert hub.downloads(SMOL_KEY) == 2  # one per worker, none for the other quantization
    assert hub.downloads("hf:org/smol-GGUF/smollm2-135m-instruct-q8_0.gguf") == 0
    assert fleet.chat("smol").strip()

    metrics = httpx.get(f"http://127.0.0.1:{fleet.workers['w1'].port}/metrics", timeout=10).text  # type: ignore[attr-defined]
    assert 'modelfleet_worker_downloads_total{result="ok"} 1.0' in metrics
    assert "modelfleet_worker_downloaded_bytes_total 9.8362432e+07" in metrics
    wait_for(lambda: SMOL in fleet.worker_record("w1")["resources"]["cached_models"], 10, what="w1 reports its cache")


def test_replacement_replica_starts_from_a_worker_that_holds_the_file(fleet: Fleet, hub: FakeHub) -> None:
    # w0 would win every tie-break but the cache's; w3 gets the file ahead of time.
    fleet.start_worker("w0")
    fleet.start_worker("w3")
    r = fleet.cli("models", "pull", "hf://org/smol-GGUF", "--quant", "q4_1", "--worker", "w3")
    assert r.returncode == 0, r.stderr
    assert f"w3: {SMOL} is in the cache (93.8 MiB)" in " ".join(r.stdout.split())
    assert hub.downloads(SMOL_KEY) == 3
    listing = fleet.cli("cache", "--worker", "w3", "--json")
    assert [e["source"] for e in json.loads(listing.stdout)["w3"]["data"]] == [SMOL]
    wait_for(lambda: SMOL in fleet.worker_record("w3")["resources"]["cached_models"], 10, what="w3 reports it")

    fleet.workers["w1"].kill()  # kill -9: its replica is moved after the grace period
    wait_for(lambda: all(i["worker_id"] != "w1" for i in fleet.instances("smol")), 60, what="the replica off w1")
    ready = fleet.ready("smol", 2)
    assert sorted(i["worker_id"] for i in ready) == ["w2", "w3"]
    assert hub.downloads(SMOL_KEY) == 3  # the replacement started from w3's cache
    assert not fleet.instances() or all(i["worker_id"] != "w0" for i in fleet.instances())
    assert fleet.chat("smol").strip()
    assert fleet.cli("undeploy", "smol").returncode == 0


def test_a_worker_killed_mid_download_resumes_after_restart(fleet: Fleet, hub: FakeHub) -> None:
    """A model the worker declares itself (--model with a remote source), so the replica is not
    moved while its worker is down."""
    hub.add_hf("org/resume", {"smol.gguf": GGUF})
    declared = "resumed=llama.cpp:hf://org/resume/smol.gguf"
    partial = fleet.home / "models-w4" / "hf" / "org" / "resume"
    hub.throttle = 15e6
    try:
        w4 = fleet.start_worker("w4", "--model", declared)
        wait_for(
            lambda: sum(p.stat().st_size for p in partial.rglob("*.partial")) > SIZE // 3,
            60,
            interval=0.1,
            what="a third of the file downloaded",
        )
        w4.kill()
    finally:
        hub.throttle = None
    on_disk = sum(p.stat().st_size for p in partial.rglob("*.partial"))
    assert SIZE // 3 < on_disk < SIZE
    fleet.start_worker("w4", "--model", declared)
    fleet.ready("resumed", 1)
    served = hub.served("hf:org/resume/smol.gguf")
    assert served.downloads == 2
    assert served.ranges[0] is None and int(served.ranges[1].removeprefix("bytes=").rstrip("-")) >= on_disk - (1 << 20)
    assert fleet.chat("resumed").strip()
    fleet.workers["w4"].stop()


def test_a_gated_repo_without_token_fails_with_the_reason_and_no_crash_loop(fleet: Fleet, hub: FakeHub) -> None:
    hub.add_hf("org/gated-GGUF", {"smol.gguf": GGUF}, gated=True)
    assert fleet.cli("deploy", "gated", "--model", "hf://org/gated-GGUF/smol.gguf").returncode == 0
    failed = wait_for(
        lambda: [i for i in fleet.instances("gated") if i["state"] == "failed"],
        60,
        what="the gated deployment's instance failed",
    )[0]
    assert failed["last_error"].startswith("download failed: hf://org/gated-GGUF/smol.gguf@main: gated repository (401")
    assert "HF_TOKEN" in failed["last_error"] and "trying again in 60 s" in failed["last_error"]
    time.sleep(3)
    after = fleet.instances("gated")[0]
    assert (after["state"], after["restarts"]) == ("failed", 0)
    resolves = [r for r in hub.requests if "/org/gated-GGUF/resolve/" in r[1]]
    assert len(resolves) == 1  # one try, then the next one only after the backoff: no loop
    logs = fleet.cli("instances", "--logs", failed["id"]).stdout
    assert "download failed: hf://org/gated-GGUF/smol.gguf@main: gated repository" in logs
    assert fleet.cli("undeploy", "gated").returncode == 0


def test_https_with_a_checksum_two_replicas_and_a_wrong_checksum_refused(fleet: Fleet, hub: FakeHub) -> None:
    hub.add_file("smol.gguf", GGUF)
    url = f"https://127.0.0.1:{hub.https_port}/files/smol.gguf"
    assert fleet.cli("deploy", "bad", "--model", f"{url}#sha256={'0' * 64}").returncode == 0
    failed = wait_for(
        lambda: [i for i in fleet.instances("bad") if i["state"] == "failed"], 60, what="the wrong checksum refused"
    )[0]
    assert "checksum mismatch: expected sha256 " + "0" * 64 in failed["last_error"]
    assert fleet.cli("undeploy", "bad").returncode == 0

    sha = cached_blob(GGUF).sha256
    before = hub.downloads("files:smol.gguf")
    r = fleet.cli("deploy", "tls", "--model", f"{url}#sha256={sha}", "--replicas", "2", *LIGHT)
    assert r.returncode == 0, r.stderr
    ready = fleet.ready("tls", 2)
    assert len({i["worker_id"] for i in ready}) == 2
    assert hub.downloads("files:smol.gguf") - before == 2
    assert fleet.chat("tls").strip()
    assert fleet.cli("undeploy", "tls").returncode == 0


def test_modelscope_snapshot_two_replicas_serve_embeddings(fleet: Fleet, hub: FakeHub) -> None:
    hub.add_modelscope("org/all-MiniLM-L6-v2", MINILM_FILES)
    r = fleet.cli(
        "deploy",
        "minilm",
        "--model",
        "modelscope://org/all-MiniLM-L6-v2",
        "--backend",
        "sentence-transformers",
        "--replicas",
        "2",
        "--param",
        "n_threads=1",
    )
    assert r.returncode == 0, r.stderr
    ready = fleet.ready("minilm", 2)
    assert len({i["worker_id"] for i in ready}) == 2
    assert hub.downloads("modelscope:org/all-MiniLM-L6-v2/model.safetensors") == 2
    assert hub.downloads("modelscope:org/all-MiniLM-L6-v2/.gitattributes") == 0  # not part of a snapshot
    client = openai.OpenAI(base_url=f"{fleet.gateway}/v1", api_key="none", max_retries=0, timeout=60)
    emb = client.embeddings.create(model="minilm", input=["modelfleet", "serves models"])
    assert [len(d.embedding) for d in emb.data] == [384, 384]
    assert fleet.cli("undeploy", "minilm").returncode == 0


def test_catalog_listing_deploy_by_name_and_cache_prune(fleet: Fleet) -> None:
    listed = json.loads(fleet.cli("catalog", "--json").stdout)
    by_name = {e["name"]: e for e in listed}
    assert by_name["tiny-chat"]["origin"].endswith("catalog.yaml")
    assert by_name["qwen2.5-0.5b-instruct"]["origin"] == "built-in"
    assert "tiny-chat" in fleet.cli("catalog").stdout

    r = fleet.cli("deploy", "tiny-chat", "--replicas", "0", "--json")  # no --model, no --backend
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["source"], d["backend"], d["params"]) == (SMOL, "llama.cpp", {"n_ctx": 512, "n_threads": 1})
    assert d["model_bytes"] == SIZE and d["model_bytes_from"].startswith("hub: 1 file(s)")
    assert d["placement"]["memory"] == 512 << 20  # the catalog's memory figure
    assert fleet.cli("undeploy", "tiny-chat").returncode == 0

    r = fleet.cli("cache", "prune", "--worker", "w3")
    assert r.returncode == 0 and "removed 1 item(s), freed 93.8 MiB" in r.stdout and SMOL in r.stdout, r.stdout
    assert json.loads(fleet.cli("cache", "--worker", "w3", "--json").stdout)["w3"]["data"] == []
    assert not list((fleet.home / "models-w3").rglob("*.gguf"))
