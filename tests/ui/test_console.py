"""The web console in headless Chromium against a real cluster (`modelfleet up`: controller,
worker, gateway, the two bundled models).

One cluster serves the whole module and the tests run in file order: the playground uses
both models before the drain test takes the embedding model's instance out of rotation,
and the last test reads the request counters the earlier ones moved."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import openai
import pytest

from tests.conftest import free_port
from tests.ui.conftest import CHAT_MODEL, EMBED_MODEL, UpCluster, gateway_snapshot, http_ok, wait_until

pytestmark = pytest.mark.slow


def test_overview_lists_worker_and_models(page, cluster: UpCluster) -> None:
    page.goto("/")
    workers = page.locator("#overview-workers")
    worker_row = workers.locator('tr[data-worker="local"]')
    worker_row.wait_for()
    assert "online" in worker_row.inner_text()
    assert f"127.0.0.1:{cluster.worker_port}" in worker_row.inner_text()
    for model in (CHAT_MODEL, EMBED_MODEL):
        row = page.locator(f'#overview-models tr[data-model="{model}"]')
        row.wait_for()
        assert "1 / 1" in row.inner_text()  # ready / replicas
    assert "1 online" in page.locator("#card-workers").inner_text()
    assert "2 ready" in page.locator("#card-instances").inner_text()
    assert "fresh" in page.locator("#card-routes").inner_text()
    # The leader card names the controller holding the lease (up runs one, on our port).
    port = cluster.controller.rsplit(":", 1)[1]
    assert f":{port}" in page.locator("#card-leader").inner_text()
    assert page.locator("#banners .banner").count() == 0  # nothing wrong, nothing said


def test_workers_page_shows_resources_and_instances(page, cluster: UpCluster, shot) -> None:
    page.goto("/#/workers")
    panel = page.locator('section.worker[data-worker="local"]')
    panel.wait_for()
    text = panel.inner_text()
    assert f"127.0.0.1:{cluster.worker_port}" in text
    assert "Memory" in text and "GiB" in text  # memory bar with used / total
    assert "cores" in text
    for model in (CHAT_MODEL, EMBED_MODEL):
        assert model in text
    # The chat model's llama-server reports its slots (busy / total) and queue; the
    # embeddings runner has none.
    busy = panel.locator(".slots-busy")
    busy.first.wait_for()
    assert busy.count() == 1 and busy.first.inner_text() == "0 / 8"
    assert panel.locator(".slots-queue").first.inner_text() == "0"
    shot(page, "workers")


# Records the reply's text length on every DOM change, in the page itself, so that no
# chunk goes unseen between two polls from the test.
OBSERVE = """() => {
  window.__chat = [];
  const log = document.getElementById("chat-log");
  new MutationObserver(() => {
    const replies = log.querySelectorAll(".msg.assistant");
    const last = replies[replies.length - 1];
    if (!last) return;
    window.__chat.push({t: performance.now(), state: last.dataset.state,
                        len: last.querySelector(".text").textContent.length});
  }).observe(log, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def test_playground_streams_chat_and_embeds(page, shot) -> None:
    page.goto("/#/playground")
    page.locator(f'#chat-model option[value="{CHAT_MODEL}"]').wait_for(state="attached")
    page.select_option("#chat-model", CHAT_MODEL)
    page.fill("#chat-max-tokens", "64")
    page.evaluate(OBSERVE)
    page.fill("#chat-input", "Write two sentences about the sea.")
    page.click("#chat-send")
    reply = page.locator(".msg.assistant").last
    page.wait_for_selector('.msg.assistant[data-state="done"], .msg.assistant[data-state="error"]', timeout=120_000)
    assert reply.get_attribute("data-state") == "done", reply.inner_text()
    final = reply.locator(".text").inner_text()
    assert final.strip(), "the streamed reply is empty"

    seen = page.evaluate("window.__chat")
    streaming = [o["len"] for o in seen if o["state"] == "streaming" and o["len"] > 0]
    # Text appeared progressively: at least two different non-empty lengths while the
    # stream was still open, growing, and short of the final text.
    distinct = sorted(set(streaming))
    assert len(distinct) >= 2, f"reply did not grow while streaming: {seen}"
    assert streaming == sorted(streaming), f"reply shrank while streaming: {streaming}"
    assert distinct[0] < len(final)
    assert "first token after" in reply.locator(".stats").inner_text()

    page.select_option("#embed-model", EMBED_MODEL)
    page.fill("#embed-input", "modelfleet serves models")
    page.click("#embed-go")
    page.locator("#embed-dim").wait_for(timeout=60_000)
    assert page.locator("#embed-dim").inner_text() == "384"
    assert page.locator("#embed-preview").inner_text().startswith("[")
    shot(page, "playground")


def _status(gateway: str, key: str | None) -> int:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{gateway}/v1/embeddings", headers=headers, timeout=30,
                   json={"model": EMBED_MODEL, "input": "ping"})
    return r.status_code


def _client_works(gateway: str, key: str) -> bool | int:
    """True when the official client gets a completion with this key; else the HTTP status."""
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0, timeout=60)
    try:
        r = client.chat.completions.create(model=CHAT_MODEL, max_tokens=4,
                                           messages=[{"role": "user", "content": "Say hi"}])
    except openai.APIStatusError as exc:
        return exc.status_code
    return bool(r.choices and r.choices[0].message.content is not None)


def _create_key(page, name: str) -> tuple[str, str]:
    page.fill("#key-name", name)
    page.click("#key-create")
    box = page.locator("#key-secret-box .secret-box")
    page.wait_for_function(
        "name => document.querySelector('#key-secret-box strong')?.textContent.includes(name)", arg=name)
    secret = page.locator("#key-secret").inner_text().strip()
    key_id = box.get_attribute("data-key-id")
    assert secret.startswith("mf-") and key_id
    page.locator(f'#key-list tr[data-key-id="{key_id}"]').wait_for()
    return key_id, secret


def _revoke_in_page(page, key_id: str) -> None:
    row = page.locator(f'#key-list tr[data-key-id="{key_id}"]')
    row.locator('button[data-action="revoke"]').click()  # the confirm dialog is accepted
    page.wait_for_function(
        "id => document.querySelector(`#key-list tr[data-key-id=\"${id}\"]`)?.textContent.includes('revoked')",
        arg=key_id)


def test_api_key_created_in_page_works_then_revoked(page, cluster: UpCluster, shot) -> None:
    gw = cluster.gateway
    page.goto("/#/keys")
    page.locator("#key-list").get_by_text("No key: inference is open.").wait_for()
    assert _status(gw, None) == 200  # no key defined: open

    key_id, secret = _create_key(page, "console-e2e")
    # Once the gateway has the new route table, a call without a key is refused.
    wait_until(lambda: _status(gw, None) == 401, 20, what="401 without a key once a key exists")
    body = httpx.post(f"{gw}/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"}, timeout=30).json()
    assert body["error"]["message"]  # OpenAI error body
    assert _client_works(gw, secret) is True
    assert _client_works(gw, "mf-not-a-key") == 401

    # Revoking one key leaves the others working.
    keeper_id, keeper = _create_key(page, "console-keeper")
    _revoke_in_page(page, key_id)
    wait_until(lambda: _client_works(gw, secret) == 401, 20, what="401 for the revoked key")
    assert _client_works(gw, keeper) is True
    assert "1 active" in page.locator("#key-list").inner_text()
    shot(page, "keys")

    # Revoking the last key closes inference: it never reopens it.
    _revoke_in_page(page, keeper_id)
    wait_until(lambda: _client_works(gw, keeper) == 401, 20, what="401 for the last key, revoked")
    assert _status(gw, None) == 401
    assert "All revoked: inference is closed" in page.locator("#key-list").inner_text()


def test_instance_logs_filtered_by_request_id(page, cluster: UpCluster, shot) -> None:
    """The Logs button shows the runner's log; a request id keeps only that request's lines.
    On the embeddings model: our sentence-transformers server logs request ids (llama-server,
    the chat model's, does not). A key of its own: the keys test before it closed inference."""
    key = httpx.post(f"{cluster.controller}/v1/cluster/keys", json={"name": "console-logs"}, timeout=10).json()["key"]
    wait_until(lambda: _status(cluster.gateway, key) == 200, 20, what="the gateway to take the new key")
    r = httpx.post(f"{cluster.gateway}/v1/embeddings", timeout=60,
                   headers={"X-Request-ID": "console-rid-1", "authorization": f"Bearer {key}"},
                   json={"model": EMBED_MODEL, "input": "Hi"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "console-rid-1"
    inst = r.headers["x-modelfleet-instance"]
    page.goto("/#/models")
    row = page.locator(f'section.model[data-model="{EMBED_MODEL}"] tr[data-instance-id="{inst}"]')
    row.wait_for()
    row.locator('button[data-action="logs"]').click()
    lines = page.locator("#logs-lines")
    page.wait_for_function("() => document.querySelector('#logs-lines')?.textContent.length > 0", timeout=15_000)
    assert "\n" in lines.inner_text()  # the whole tail, several lines
    page.fill("#logs-request", "console-rid-1")
    page.click('button[data-action="logs-show"]')
    page.wait_for_function("() => document.querySelector('#logs-status')?.textContent.includes('naming request')",
                           timeout=15_000)
    text = lines.inner_text()
    assert text.count("\n") == 0 and "request console-rid-1: POST /v1/embeddings -> 200" in text, text
    shot(page, "instance-logs")
    page.click('button[data-action="logs-close"]')


def test_drain_button_shows_instance_draining(page, cluster: UpCluster, shot) -> None:
    instances = httpx.get(f"{cluster.controller}/v1/cluster/instances", timeout=10).json()["data"]
    inst = next(i for i in instances if i["model"] == EMBED_MODEL and i["state"] == "ready")
    page.goto("/#/models")
    row = page.locator(f'section.model[data-model="{EMBED_MODEL}"] tr[data-instance-id="{inst["id"]}"]')
    row.wait_for()
    assert row.locator(".state").inner_text() == "ready"
    row.locator('button[data-action="drain"]').click()  # confirm dialog accepted
    page.wait_for_function(
        "id => document.querySelector(`tr[data-instance-id=\"${id}\"] .state`)?.textContent === 'draining'",
        arg=inst["id"], timeout=15_000)
    assert page.locator(".toast").filter(has_text="draining").count() >= 1
    after = httpx.get(f"{cluster.controller}/v1/cluster/instances/{inst['id']}", timeout=10).json()
    assert after["enabled"] is False and after["state"] == "draining"
    # The other model is untouched and still drainable.
    chat = page.locator(f'section.model[data-model="{CHAT_MODEL}"]')
    assert chat.locator(".state").first.inner_text() == "ready"
    shot(page, "models")


def test_admin_token_box(page) -> None:
    """The `up` cluster has no admin token, so the browser plays one: every /v1/cluster call
    without "Bearer right-token" gets the controller's 401 body. The page must say so with
    the API's message, and work once the token is entered in Settings, which keeps it in
    sessionStorage only."""
    body = '{"error": {"message": "admin token required (Authorization: Bearer …)", ' \
           '"type": "authentication_error", "param": null, "code": "missing_token"}}'

    def gate(route) -> None:
        if route.request.headers.get("authorization") == "Bearer right-token":
            route.continue_()
        else:
            route.fulfill(status=401, content_type="application/json", body=body)

    page.route("**/v1/cluster/**", gate)
    page.goto("/")
    banner = page.locator("#banners .banner").filter(has_text="needs the admin token")
    banner.wait_for()
    assert "admin token required (Authorization: Bearer …)" in banner.inner_text()
    banner.get_by_role("button", name="Open settings").click()
    page.fill("#admin-token", "right-token")
    page.click("#settings-save")
    banner.wait_for(state="detached")
    page.locator('#overview-workers tr[data-worker="local"]').wait_for()
    assert "admin" in page.locator("#cred-state").inner_text()
    stored = page.evaluate("[sessionStorage.getItem('modelfleet.adminToken'), localStorage.length]")
    assert stored == ["right-token", 0]
    page.click("#open-settings")
    page.click("#settings-clear")
    banner.wait_for()
    assert page.evaluate("sessionStorage.getItem('modelfleet.adminToken')") is None


def test_controller_down_shows_stale_table_and_banner(browser, cluster: UpCluster, tmp_path, shot) -> None:
    """A second gateway whose only controller is down, started from the first one's route
    snapshot: the console says so in a banner and still shows what the gateway routes."""
    snapshot = gateway_snapshot(cluster, tmp_path / "routes.json")
    port, dead = free_port(), free_port()
    log = open(tmp_path / "gateway.log", "wb")
    gw = subprocess.Popen(
        [sys.executable, "-m", "modelfleet.cli", "gateway", "--controller", f"http://127.0.0.1:{dead}",
         "--host", "127.0.0.1", "--port", str(port), "--snapshot-path", str(snapshot)],
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{base}/health/live"), 30, what="second gateway")
        context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=base)
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto("/")
        banner = pg.locator("#banners .banner.error").filter(has_text="No controller answers")
        banner.wait_for(timeout=30_000)
        assert "stale" in banner.inner_text()
        assert pg.locator("#banners .banner").filter(has_text="Route table is stale").count() == 1
        assert "stale" in pg.locator("#card-routes").inner_text()
        for model in (CHAT_MODEL, EMBED_MODEL):  # from the route table, not the controller
            pg.locator(f'#overview-models tr[data-model="{model}"]').wait_for()
        shot(pg, "controller-down")
        pg.goto("/#/models")
        pg.locator(f'section.model[data-model="{CHAT_MODEL}"] tr[data-instance-id]').first.wait_for()
        assert "Actions unavailable" in pg.locator("#page").inner_text()
        context.close()
        assert not errors, errors
    finally:
        gw.send_signal(signal.SIGINT)
        try:
            gw.wait(30)
        except subprocess.TimeoutExpired:
            gw.kill()
            gw.wait()
            pytest.fail("the second gateway did not stop on SIGINT")


def test_overview_charts_request_counters(page, shot) -> None:
    """The earlier tests sent requests through the gateway (chat, embeddings, the openai
    client): the overview's chart, drawn from /v1/gateway/status, shows them."""
    page.goto("/")
    page.locator("#overview-traffic svg rect.ok-bar").first.wait_for(state="attached")
    titles = page.locator("#overview-traffic svg title").all_text_contents()
    assert sum(int(t.split(": ")[1].split(" ")[0]) for t in titles) >= 5, titles
    shot(page, "overview")


def test_deploy_form_downloads_a_model_and_brings_it_up(page, cluster: UpCluster, hub, shot) -> None:
    """The models page's deploy form: a catalog entry fills it; an ambiguous repository is
    refused with the API's message; a hub source deploys, its download shows as a progress bar
    on the instance, and the instance comes up ready."""
    from modelfleet.bundled import BUNDLED

    gguf = BUNDLED[CHAT_MODEL].path()
    hub.add_hf("org/multi-GGUF", {"m-q4_1.gguf": gguf, "m-q8_0.gguf": gguf})
    hub.add_hf("org/tiny-GGUF", {"tiny.gguf": gguf})
    page.goto("/#/models")
    page.click("#deploy-panel summary")
    page.locator('#deploy-catalog option[value="qwen2.5-0.5b-instruct"]').wait_for(state="attached")
    page.select_option("#deploy-catalog", "qwen2.5-0.5b-instruct")
    assert page.input_value("#deploy-name") == "qwen2.5-0.5b-instruct"
    assert page.input_value("#deploy-source") == "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"
    assert page.input_value("#deploy-backend") == "llama.cpp"
    assert "469 MiB to download, 1.0 GiB RAM per replica" in page.locator("#deploy-about").inner_text()
    shot(page, "deploy-form")

    page.select_option("#deploy-catalog", "")
    page.fill("#deploy-name", "from-hub")
    page.fill("#deploy-source", "hf://org/multi-GGUF")
    page.select_option("#deploy-backend", "llama.cpp")
    page.click("#deploy-submit")
    error = page.locator("#deploy-error")
    page.wait_for_function("() => document.querySelector('#deploy-error').textContent.includes('GGUF files')")
    assert error.inner_text().startswith("400 hf://org/multi-GGUF@main has 2 GGUF files: m-q4_1.gguf")

    page.fill("#deploy-source", "hf://org/tiny-GGUF/tiny.gguf")
    page.fill("#deploy-labels", "")
    hub.throttle = 8e6  # ~12 s: long enough to watch the progress bar move
    try:
        page.click("#deploy-submit")
        page.locator(".toast").filter(has_text="from-hub deployed").wait_for()
        bar = page.locator('section.model[data-model="from-hub"] .download')
        bar.wait_for(timeout=60_000)
        page.wait_for_function(
            "() => Number(document.querySelector('section.model[data-model=\"from-hub\"] .download')"
            "?.dataset.done) > 0")
        first = int(bar.get_attribute("data-done"))
        assert "% of 93.8 MiB" in bar.inner_text()
        assert page.locator('section.model[data-model="from-hub"] .state').inner_text() == "downloading"
        page.wait_for_function(
            "first => Number(document.querySelector('section.model[data-model=\"from-hub\"] .download')"
            "?.dataset.done) > first", arg=first)  # it moves
        shot(page, "deploy-download")
    finally:
        hub.throttle = None
    page.wait_for_function(
        "() => document.querySelector('section.model[data-model=\"from-hub\"] .state')?.textContent === 'ready'",
        timeout=120_000)
    assert hub.downloads("hf:org/tiny-GGUF/tiny.gguf") == 1
    page.goto("/#/workers")
    cache = page.locator('section.worker[data-worker="local"]')
    cache.get_by_text("hf://org/tiny-GGUF/tiny.gguf@main").wait_for()


def test_models_page_shows_autoscaling_and_the_last_decision(page, cluster: UpCluster) -> None:
    r = httpx.patch(f"{cluster.controller}/v1/cluster/deployments/{CHAT_MODEL}", timeout=10,
                    json={"autoscale": {"min_replicas": 1, "max_replicas": 2, "target_ongoing": 3}})
    assert r.status_code == 200, r.text
    page.goto("/#/models")
    panel = page.locator(f'section.model[data-model="{CHAT_MODEL}"]')
    panel.locator(".autoscale").wait_for()
    assert panel.locator(".autoscale").inner_text() == "autoscale 1..2 replicas, target 3"
    assert panel.locator('button[data-action="scale-up"]').count() == 0  # the autoscaler's to change
    page.wait_for_function(
        "m => document.querySelector(`section.model[data-model=\"${m}\"] .autoscale-decision`)"
        "?.textContent.includes('Last decision')", arg=CHAT_MODEL, timeout=15_000)
    assert "Desired 1 replica(s)." in panel.locator(".autoscale-decision").inner_text()
