// The operations table, virtualized: only the rows in view (and a few on
// either side) exist in the page, so 5,000 operations changing constantly cost
// the same to draw as 30. Rows are recycled, and a row's HTML is rewritten
// only when what it shows has changed.
import * as f from "./format.js";

const ROW_HEIGHT = 40;
const OVERSCAN = 6;

export function rowHtml(op, now = Date.now()) {
  const pct = f.percent(op);
  const badges = [];
  if (op.stalled) badges.push('<span class="badge stalled" title="no heartbeat">stalled</span>');
  if (op.cancelRequested && f.ACTIVE.has(op.state)) {
    badges.push('<span class="badge alert" title="cancel requested">cancelling</span>');
  }
  for (const alert of op.alerts || []) {
    if (alert.type === "STALLED") continue;
    badges.push(
      `<span class="badge alert" title="${f.escape(alert.message)}">${f.escape(
        alert.type.toLowerCase().replace(/_/g, " "),
      )}</span>`,
    );
  }
  if (f.num(op.errorCount)) {
    badges.push(`<span class="badge errors" title="errors logged">${f.count(op.errorCount)} err</span>`);
  }
  const eta = f.etaLeft(op, now);
  return `
    <span class="opname"><span>${f.escape(op.kind)}${badges.join("")}</span>
      <span class="mono">${f.escape(op.id)}</span></span>
    <span class="state ${op.state}">${op.state}</span>
    <span class="progress"><span class="bar ${op.state}"><span style="width:${pct.toFixed(1)}%"></span></span>
      <span class="pct num">${pct.toFixed(pct < 10 && pct > 0 ? 1 : 0)}%</span></span>
    <span title="${f.escape(op.message || "")}">${f.escape(op.stage || "")}</span>
    <span class="num">${f.escape(f.done(op))}</span>
    <span class="num">${f.rate(op.throughput, op.throughputUnit)}</span>
    <span class="num eta">${eta === undefined ? "" : f.span(eta)}</span>
    <span class="muted">${f.ago(op.updatedAt, now)}</span>`;
}

export class OperationTable {
  constructor(viewport, spacer) {
    this.viewport = viewport;
    this.spacer = spacer;
    this.rows = [];
    this.shown = [];
    viewport.addEventListener("scroll", () => this.draw(), { passive: true });
  }

  show(operations) {
    this.shown = operations;
    this.spacer.style.height = `${operations.length * ROW_HEIGHT}px`;
    this.draw();
  }

  draw() {
    const top = this.viewport.scrollTop;
    const height = this.viewport.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / ROW_HEIGHT) - OVERSCAN);
    const last = Math.min(this.shown.length, Math.ceil((top + height) / ROW_HEIGHT) + OVERSCAN);
    const needed = last - first;
    while (this.rows.length < needed) {
      const row = document.createElement("a");
      row.className = "row";
      row.setAttribute("role", "row");
      this.viewport.append(row);
      this.rows.push({ element: row, html: "", id: "" });
    }
    const now = Date.now();
    for (let i = 0; i < this.rows.length; i += 1) {
      const row = this.rows[i];
      const op = this.shown[first + i];
      if (i >= needed || !op) {
        if (!row.element.hidden) {
          // A spare row names no operation (a locator must find one row per id).
          row.element.hidden = true;
          row.id = "";
          row.html = "";
          delete row.element.dataset.id;
          row.element.removeAttribute("href");
          row.element.innerHTML = "";
        }
        continue;
      }
      row.element.hidden = false;
      row.element.style.transform = `translateY(${(first + i) * ROW_HEIGHT}px)`;
      if (row.id !== op.id) {
        row.id = op.id;
        row.element.dataset.id = op.id;
        row.element.href = `#/op/${encodeURIComponent(op.id)}`;
      }
      const html = rowHtml(op, now);
      if (html !== row.html) {
        row.html = html;
        row.element.innerHTML = html;
      }
    }
  }
}
