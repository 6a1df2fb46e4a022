// How values read on the page. Proto3 JSON gives int64 as strings, Durations
// as "12.5s" and Timestamps as RFC 3339 strings; these turn them into text.

export const ACTIVE = new Set(["QUEUED", "RUNNING", "PAUSED"]);
export const STATES = ["QUEUED", "RUNNING", "PAUSED", "SUCCEEDED", "FAILED", "CANCELLED"];

export function escape(text) {
  return String(text ?? "").replace(
    /[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c],
  );
}

export function num(value) {
  return Number(value || 0);
}

export function count(value) {
  const n = num(value);
  return Number.isInteger(n) ? n.toLocaleString("en-US") : n.toFixed(2);
}

export function seconds(duration) {
  // "1.5s" -> 1.5; undefined when unset
  if (!duration) return undefined;
  return parseFloat(duration);
}

export function ms(timestamp) {
  return timestamp ? Date.parse(timestamp) : undefined;
}

export function span(totalSeconds) {
  if (totalSeconds === undefined || !Number.isFinite(totalSeconds)) return "";
  let s = Math.max(0, Math.round(totalSeconds));
  if (s < 60) return `${s}s`;
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  s %= 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  return `${m}m ${String(s).padStart(2, "0")}s`;
}

// The ETA left now: the server's estimated completion time counts down in
// the browser between events (it is only re-estimated on reports).
export function etaLeft(op, now = Date.now()) {
  if (!ACTIVE.has(op.state) || op.state === "PAUSED") return undefined;
  const end = ms(op.estimatedCompletionTime);
  if (end === undefined) return undefined;
  return Math.max(0, (end - now) / 1000);
}

export function percent(op) {
  return Math.max(0, Math.min(100, num(op.percent)));
}

export function rate(value, unit) {
  const n = num(value);
  if (!n) return "";
  const shown = n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2);
  return unit === "" ? `${shown}/s` : `${shown} ${unit || "units"}/s`;
}

export function time(timestamp) {
  const t = ms(timestamp);
  if (t === undefined) return "";
  return new Date(t).toLocaleTimeString([], { hour12: false });
}

export function ago(timestamp, now = Date.now()) {
  const t = ms(timestamp);
  if (t === undefined) return "";
  return `${span((now - t) / 1000)} ago`;
}

// "done / total unit", or "done unit" without a total; "" before anything is done.
export function done(op) {
  const unit = op.unit ? ` ${op.unit}` : "";
  if (num(op.total)) return `${count(op.completed)} / ${count(op.total)}${unit}`;
  return num(op.completed) ? `${count(op.completed)}${unit}` : "";
}

export function labels(op) {
  return Object.entries(op.labels || {})
    .map(([k, v]) => `${k}=${v}`)
    .join(" ");
}
