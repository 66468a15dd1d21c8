// Number and time formatting shared by the pages.

export function bytes(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

/** Seconds as "0.4 s", "12 s", "3 min 05 s", "2 h 10 min". */
export function seconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "–";
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(Math.round(s % 60)).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

export function ago(s) {
  return s === null || s === undefined ? "never" : `${seconds(s)} ago`;
}

/** Wall-clock time of an epoch-seconds value, local time, HH:MM:SS. */
export function clock(epochS) {
  return new Date(epochS * 1000).toLocaleTimeString([], { hour12: false });
}

export function rate(perSecond) {
  if (perSecond === 0) return "0";
  if (perSecond < 0.1) return perSecond.toFixed(2);
  return perSecond < 10 ? perSecond.toFixed(1) : Math.round(perSecond).toString();
}

export function plural(n, word, many = `${word}s`) {
  return `${n} ${n === 1 ? word : many}`;
}
