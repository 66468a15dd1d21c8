"""Fixtures for the web console tests: a real cluster from `modelfleet up` (one per module),
Debian's Chromium driven by Playwright, and screenshots.

The browser is /usr/bin/chromium (apt `chromium`), never one Playwright downloads. Without
it or the `playwright` package, these tests skip with a line saying why (fail in CI=true).

Screenshots go to $MODELFLEET_UI_SCREENSHOTS when set (docs/screenshots is where the
committed ones live: `MODELFLEET_UI_SCREENSHOTS=docs/screenshots pytest tests/ui`), else
to the test's tmp dir, so an ordinary run does not rewrite the committed images."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import IN_CI, free_port
from tests.fakes.hub import FakeHub, self_signed_cert

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}
UP_READY_TIMEOUT_S = 300.0
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} and CI=true: scripts/install.sh should have installed it")
    pytest.skip(f"{what}; run scripts/install.sh as root to install it")


def free_port_range(n: int) -> int:
    """A base port with n free ports after it (runners of `up` take consecutive ports)."""
    for _ in range(50):
        base = free_port()
        if base + n > 65000:
            continue
        ok = True
        for p in range(base + 1, base + n):
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            except OSError:
                ok = False
                break
        if ok:
            return base
    raise RuntimeError("no free port range")


@dataclass
class UpCluster:
    home: Path
    gateway: str
    controller: str
    worker_port: int
    popen: subprocess.Popen[str]
    stdout_lines: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("controller", "worker", "gateway"):
            p = self.home / "logs" / f"{name}.log"
            if p.exists():
                out.append(f"--- {name}.log")
                out.extend(p.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def _pump(stream, lines: list[str], ready: threading.Event) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))
        if line.startswith("READY "):
            ready.set()
    ready.set()  # EOF: the process ended (the waiter checks why)


def _still_running(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A fake Hugging Face Hub the cluster's worker downloads from (the deploy form's test)."""
    h = FakeHub(cert=self_signed_cert(tmp_path_factory.mktemp("tls"))).start()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[UpCluster]:
    """`python -m modelfleet.cli up` on free ports; READY on stdout; SIGINT at the end, after
    which neither it nor anything it started may be left."""
    home = tmp_path_factory.mktemp("up-home")
    gw, ctl, wk = free_port(), free_port(), free_port()
    runners = free_port_range(10)
    env = hub.client_env(PYTHONUNBUFFERED="1")
    for k in [k for k in env if k.startswith("MODELFLEET_")]:
        env.pop(k)
    popen = subprocess.Popen(
        [sys.executable, "-m", "modelfleet.cli", "up", "--home", str(home), "--gateway-port", str(gw),
         "--controller-port", str(ctl), "--worker-port", str(wk), "--runner-port-start", str(runners)],
        stdout=subprocess.PIPE, stderr=open(home / "up.stderr", "w"), text=True, env=env,
    )
    c = UpCluster(home=home, gateway=f"http://127.0.0.1:{gw}", controller=f"http://127.0.0.1:{ctl}",
                  worker_port=wk, popen=popen)
    ready = threading.Event()
    threading.Thread(target=_pump, args=(popen.stdout, c.stdout_lines, ready), daemon=True).start()
    try:
        if not ready.wait(UP_READY_TIMEOUT_S) or not any(x.startswith("READY ") for x in c.stdout_lines):
            stderr = (home / "up.stderr").read_text(errors="replace")[-3000:]
            pytest.fail(f"`modelfleet up` not READY (exit {popen.poll()}):\n{stderr}\n{c.log_tail()}")
        assert c.stdout_lines[-1] == f"READY {c.gateway}" or f"READY {c.gateway}" in c.stdout_lines
        yield c
    finally:
        started = c.descendants()
        if popen.poll() is None:
            popen.send_signal(signal.SIGINT)
        try:
            code = popen.wait(90)
        except subprocess.TimeoutExpired:
            code = None
        left = _still_running([psutil.Process(popen.pid)] if popen.poll() is None else [])
        left += _still_running(started)
        for p in started:  # clean up before failing, only what this fixture started
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if popen.poll() is None:
            popen.kill()
        assert not left, f"processes left after SIGINT to `modelfleet up`: {left}"
        assert code == 0, f"`modelfleet up` exited {code} after SIGINT"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        _missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, cluster: UpCluster) -> Iterator[object]:
    """A fresh tab on the cluster's gateway. Confirm dialogs are accepted. A JavaScript
    exception anywhere in the page fails the test."""
    context = browser.new_context(viewport=VIEWPORT, base_url=cluster.gateway)
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("dialog", lambda d: d.accept())
    yield pg
    context.close()
    assert not errors, f"JavaScript errors in the console page: {errors}"


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("MODELFLEET_UI_SCREENSHOTS")
    d = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def shot(screenshot_dir: Path):
    """shot(page, "overview") writes overview.png (the whole page)."""

    def take(pg, name: str) -> Path:
        path = screenshot_dir / f"{name}.png"
        pg.screenshot(path=str(path), full_page=True, animations="disabled", caret="hide")
        return path

    return take


def wait_until(fn, timeout: float = 20.0, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def gateway_snapshot(cluster: UpCluster, dest: Path) -> Path:
    """A copy of the route table the `up` gateway persisted (for a gateway started later)."""
    src = cluster.home / "gateway-routes.json"
    wait_until(src.exists, 10, what=f"{src}")
    shutil.copy(src, dest)
    return dest


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False
