// The console's entry point. How it fits together:
//
//   main.js     tabs and hash routes (#/overview …), banners, settings box, toasts
//   poller.js   polls the gateway and the cluster every ~2 s, keeps the last good answers
//   view.js     joins those answers into workers / models / instances for the pages
//   api.js      every HTTP call, credentials (sessionStorage), OpenAI error bodies
//   sse.js      reads a streamed chat completion (server-sent events) from fetch()
//   pages/*.js  one module per tab: mount(el, app) once, update(state) after every poll
//
// Nothing here is built or bundled: the browser loads these files as they are.

import { credentials } from "./api.js";
import { h } from "./dom.js";
import { ago, seconds } from "./format.js";
import { Poller, clusterError, clusterLoaded } from "./poller.js";
import overview from "./pages/overview.js";
import workers from "./pages/workers.js";
import models from "./pages/models.js";
import playground from "./pages/playground.js";
import keys from "./pages/keys.js";

const PAGES = [overview, workers, models, playground, keys];
const poller = new Poller(2000);
let current = null;

// What pages may use besides the poll state.
const app = {
  refresh: () => poller.refresh(),
  toast,
  credentialsChanged,
};

// -- routing ----------------------------------------------------------------------------
function route() {
  const id = location.hash.replace(/^#\/?/, "") || "overview";
  const page = PAGES.find((p) => p.id === id) ?? overview;
  if (page === current) return;
  current?.unmount?.();
  current = page;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.page === page.id);
  document.title = `${page.title} · modelfleet`;
  const el = document.getElementById("page");
  el.dataset.page = page.id;
  page.mount(el, app);
  if (poller.started) page.update(poller.state, app);
}

// -- banners: what is wrong right now, in words ------------------------------------------
function banners(state) {
  const out = [];
  const status = state.status;
  const rt = status.data?.route_table;

  if (status.error) {
    if (status.error.auth) {
      out.push(banner("warn", "Gateway status refused.", `${status.error}. Set the admin token in Settings.`, true));
    } else {
      const since = status.okAt ? ` Figures below are from ${ago((Date.now() - status.okAt) / 1000)}.` : "";
      out.push(banner("error", "The gateway does not answer.", `${status.error}. Retrying every 2 s.${since}`));
    }
  }

  const cerr = clusterError(state);
  if (cerr && !status.error?.network) {
    if (cerr.auth) {
      out.push(banner("warn", "The cluster API needs the admin token.", `${cerr}. Set it in Settings.`, true));
    } else {
      const table = rt && rt.state !== "none"
        ? ` The gateway keeps routing from its ${rt.state} route table (revision ${rt.revision}, confirmed ${ago(rt.age_s)}).`
        : "";
      const shown = clusterLoaded(state)
        ? ` Cluster details below are the last received, ${ago((Date.now() - lastClusterOk(state)) / 1000)}.`
        : " Workers, models and instances below come from the gateway's route table.";
      out.push(banner("error", "No controller answers.", `${cerr}.${table}${shown} Management actions are unavailable.`));
    }
  }

  if (rt?.state === "stale") {
    out.push(banner("warn", "Route table is stale.",
      `No controller has confirmed it for ${seconds(rt.age_s)}; the gateway serves revision ${rt.revision} ` +
      `from ${rt.source === "snapshot" ? "its on-disk snapshot" : "memory"} until one answers.`));
  } else if (rt?.state === "none") {
    out.push(banner("error", "No route table.", "The gateway has heard from no controller and has no snapshot: it cannot route requests."));
  }
  return out;
}

function lastClusterOk(state) {
  return Math.max(...["workers", "instances", "models", "deployments", "leader"].map((n) => state[n].okAt ?? 0));
}

function banner(kind, title, text, settingsButton = false) {
  return h("div", { class: `banner ${kind}` },
    h("strong", {}, title), text,
    settingsButton ? [" ", h("button", { class: "ghost small", onclick: openSettings }, "Open settings")] : null);
}

function renderChrome(state) {
  const list = banners(state);
  const box = document.getElementById("banners");
  // Rebuild only on change, so a banner's button is not replaced under the pointer.
  const key = list.map((b) => b.textContent).join("|");
  if (box.dataset.key !== key) {
    box.dataset.key = key;
    box.replaceChildren(...list);
  }
  const live = document.getElementById("live");
  const ok = !state.status.error;
  live.className = `live ${ok ? "ok" : "bad"}`;
  live.textContent = ok ? `live · ${new Date().toLocaleTimeString([], { hour12: false })}` : "gateway unreachable";
}

// -- toasts ------------------------------------------------------------------------------
function toast(message, kind = "ok") {
  const el = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  document.getElementById("toasts").append(el);
  setTimeout(() => el.remove(), kind === "error" ? 9000 : 4000);
}

// -- settings: admin token and API key, sessionStorage only ------------------------------
function openSettings() {
  document.getElementById("admin-token").value = credentials.admin;
  document.getElementById("api-key").value = credentials.apiKey;
  document.getElementById("settings").showModal();
}

function setupSettings() {
  const dialog = document.getElementById("settings");
  document.getElementById("open-settings").addEventListener("click", openSettings);
  document.getElementById("settings-cancel").addEventListener("click", () => dialog.close());
  document.getElementById("settings-clear").addEventListener("click", () => {
    credentials.set("admin", "");
    credentials.set("key", "");
    dialog.close();
    credentialsChanged();
  });
  document.getElementById("settings-form").addEventListener("submit", () => {
    credentials.set("admin", document.getElementById("admin-token").value.trim());
    credentials.set("key", document.getElementById("api-key").value.trim());
    credentialsChanged(); // the dialog closes itself (method="dialog")
  });
}

function credentialsChanged() {
  const parts = [credentials.admin ? "admin ✓" : null, credentials.apiKey ? "key ✓" : null].filter(Boolean);
  document.getElementById("cred-state").textContent = parts.length ? `(${parts.join(", ")})` : "";
  poller.refresh();
}

// -- start -------------------------------------------------------------------------------
function start() {
  document.getElementById("tabs").replaceChildren(
    ...PAGES.map((p) => h("a", { href: `#/${p.id}`, dataset: { page: p.id } }, p.title)));
  setupSettings();
  credentialsChanged();
  poller.onUpdate((state) => {
    renderChrome(state);
    current?.update(state, app);
  });
  window.addEventListener("hashchange", route);
  route();
  poller.start();
}

start();
