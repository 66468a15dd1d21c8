// Tiny DOM helpers. Every page builds its elements with h(); text always goes in as text
// (never as HTML), so whatever the cluster reports cannot inject markup.

import { bytes, seconds } from "./format.js";

/**
 * h("div", {class: "card", onclick: fn}, "text", child, [more, children])
 * Attributes: "class", "text", "on<event>" (listener), "dataset" ({key: value}),
 * booleans (true sets the attribute, false/null/undefined leaves it out), anything else as is.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "value") el.value = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

/** Replace el's children; takes the same children as h() (arrays, null, text, nodes). */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

/** An SVG element (the chart); same attribute rules as h(), without listeners. */
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") el.textContent = value;
    else if (value !== null && value !== undefined) el.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) if (child) el.append(child);
  return el;
}

/** A coloured pill: kind is "ok", "warn", "bad", "info" or "" (grey). */
export function badge(text, kind = "", attrs = {}) {
  const cls = ["badge", kind, attrs.class].filter(Boolean).join(" ");
  return h("span", { ...attrs, class: cls }, text);
}

/** A table from column headers and rows (arrays of cells; a cell may be a node or text).
 *  Column specs are strings or {title, num: true} for right-aligned numbers. */
export function table(columns, rows, rowAttrs = () => ({})) {
  const cols = columns.map((c) => (typeof c === "string" ? { title: c } : c));
  return h("div", { class: "table-wrap" },
    h("table", {},
      h("thead", {}, h("tr", {}, cols.map((c) => h("th", { class: c.num ? "num" : null }, c.title)))),
      h("tbody", {}, rows.map((cells, i) => h("tr", rowAttrs(i),
        cells.map((cell, j) => (cell instanceof HTMLTableCellElement
          ? cell
          : h("td", { class: cols[j]?.num ? "num" : null }, cell))))))));
}

/** A memory-style bar: used out of total, coloured by how full it is. */
export function meter(label, used, total, format) {
  const pct = total > 0 ? Math.min(100, (100 * used) / total) : 0;
  const kind = pct >= 90 ? "bad" : pct >= 75 ? "warn" : "";
  return h("div", { class: "meter" },
    h("div", { class: "meter-label" },
      h("span", {}, label),
      h("span", { class: "muted" }, total > 0 ? `${format(used)} / ${format(total)} (${pct.toFixed(0)}%)` : "unknown")),
    h("div", { class: "bar" }, h("div", { class: `fill ${kind}`.trim(), style: `width:${pct.toFixed(1)}%` })));
}

/** A download's progress: bar, bytes, rate and time left. */
export function downloadBar(d) {
  if (d.state === "resolving") return h("div", { class: "download muted" }, "asking the hub…");
  const pct = d.total ? Math.min(100, (100 * d.done) / d.total) : 0;
  const parts = [d.total ? `${pct.toFixed(0)}% of ${bytes(d.total)}` : bytes(d.done),
    d.rate ? `${bytes(d.rate)}/s` : null, d.eta_s !== null && d.eta_s !== undefined ? `${seconds(d.eta_s)} left` : null];
  return h("div", { class: "download", dataset: { done: d.done, total: d.total ?? "" }, title: d.source },
    h("div", { class: "bar" }, h("div", { class: "fill", style: `width:${pct.toFixed(1)}%` })),
    h("div", { class: "download-text muted" }, parts.filter(Boolean).join(" · ")));
}

