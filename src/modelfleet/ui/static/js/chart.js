// A stacked bar chart of requests per time bucket (ok, client errors, errors), in SVG.

import { h, svg } from "./dom.js";
import { clock } from "./format.js";

const W = 600;
const H = 160;
const PAD = { left: 34, right: 6, top: 8, bottom: 20 };

/** series: [{start, requests, client_errors, errors}], oldest first; bucketS: bucket width. */
export function trafficChart(series, bucketS) {
  const max = Math.max(1, ...series.map((b) => b.requests));
  const top = niceCeil(max);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const slot = plotW / Math.max(1, series.length);
  const y = (v) => PAD.top + plotH - (v / top) * plotH;

  const bars = series.map((b, i) => {
    const x = PAD.left + i * slot + slot * 0.15;
    const w = slot * 0.7;
    const ok = b.requests - b.client_errors - b.errors;
    const parts = [["ok-bar", ok], ["client-bar", b.client_errors], ["err-bar", b.errors]];
    let base = 0;
    const rects = parts.filter(([, v]) => v > 0).map(([cls, v]) => {
      const r = svg("rect", { class: cls, x, width: w, y: y(base + v), height: Math.max(1, y(base) - y(base + v)) });
      base += v;
      return r;
    });
    const title = `${clock(b.start)}–${clock(b.start + bucketS)}: ${b.requests} requests, ` +
      `${b.client_errors} client errors, ${b.errors} errors`;
    return svg("g", {}, svg("title", { text: title }), svg("rect", { x, width: w, y: PAD.top, height: plotH, fill: "transparent" }), rects);
  });

  const gridlines = [0, top / 2, top].map((v) => [
    svg("line", { class: "axis", x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }),
    svg("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end", text: String(v) }),
  ]);
  const span = series.length * bucketS;
  const xlabels = [0, 0.5, 1].map((f) => svg("text", {
    x: PAD.left + f * plotW, y: H - 4, "text-anchor": f === 0 ? "start" : f === 1 ? "end" : "middle",
    text: f === 1 ? "now" : `-${Math.round((span * (1 - f)) / 60)} min`,
  }));

  const total = series.reduce((acc, b) => acc + b.requests, 0);
  const note = total === 0
    ? svg("text", { x: PAD.left + plotW / 2, y: PAD.top + plotH / 2, "text-anchor": "middle", text: "no requests in this window" })
    : null;

  return h("div", { class: "chart" },
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "requests per bucket" },
      gridlines, bars, xlabels, note),
    h("div", { class: "legend" },
      h("span", { class: "l-ok" }, "ok"),
      h("span", { class: "l-client" }, "client errors (4xx)"),
      h("span", { class: "l-err" }, "errors (5xx, 429)"),
      h("span", {}, `one bar = ${bucketS} s`)));
}

function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return Math.max(2, m * p);
  return v;
}
