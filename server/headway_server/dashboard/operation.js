// An operation's page: its own live stream (GET /v1/operations/{id}:watch),
// stages, counters, measures, error, logs with a level filter and paging,
// timeline, children with their roll-up, and a cancel button for principals
// allowed to cancel.
import { ApiError, get, LiveStream, post } from "./api.js";
import * as f from "./format.js";

const LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"];
const LOG_PAGE = 100;

export class OperationPage {
  constructor(root, id, me, known) {
    this.root = root;
    this.id = id;
    this.me = me;
    this.op = known || null;
    this.deleted = false;
    this.logs = [];
    this.logToken = "";
    this.logLevel = "";
    this.timeline = [];
    this.children = [];
    this.refreshAt = { timeline: 0, children: 0, logs: 0 };
    this.timers = {};
    this.seen = { revision: "", errors: "", warnings: "" };
    this.root.innerHTML = this.skeleton();
    this.bind();
    this.render();
    this.stream = new LiveStream(`/v1/operations/${encodeURIComponent(id)}:watch`, {
      onEvent: (type, event) => this.onEvent(type, event),
      onStatus: (state, err) => {
        if (state === "failed") this.notFound(err);
      },
    });
    this.loadLogs(true);
  }

  close() {
    this.closed = true; // loads still in flight find no page to draw on
    this.stream.close();
    for (const timer of Object.values(this.timers)) clearTimeout(timer);
    this.root.innerHTML = "";
  }

  $(selector) {
    return this.root.querySelector(selector);
  }

  // An event of the dashboard's list stream about any operation.
  fromList(op, type) {
    if (op.id === this.id && type === "deleted") this.markDeleted();
  }

  onEvent(type, event) {
    if (this.closed) return;
    if (type === "deleted") {
      this.markDeleted();
      return;
    }
    if (!event.operation) return;
    this.op = event.operation;
    this.deleted = false;
    this.render();
  }

  markDeleted() {
    this.deleted = true;
    this.render();
  }

  notFound(err) {
    if (this.closed) return;
    const message = err instanceof ApiError ? err.message : String(err);
    this.$(".op-status").innerHTML = `<div class="banner">${f.escape(message)}</div>`;
  }

  skeleton() {
    const levels = LEVELS.map((l) => `<option value="${l}">${l.toLowerCase()} and above</option>`);
    return `
      <p><a href="#/">← All operations</a></p>
      <div class="op-status"></div>
      <div class="op-head"></div>
      <div class="grid">
        <div class="card facts-card"><h2>Overview</h2><dl class="facts"></dl></div>
        <div class="card stages-card"><h2>Stages</h2><div class="stages"></div></div>
        <div class="card numbers-card"><h2>Counters and measures</h2><div class="numbers"></div></div>
        <div class="card children-card" hidden><h2>Children</h2><div class="children"></div></div>
        <div class="card wide logs-card">
          <h2>Logs <span class="spacer"></span>
            <select class="log-level" aria-label="Log level"><option value="">all levels</option>${levels.join("")}</select>
            <button type="button" class="log-reload">Reload</button>
          </h2>
          <div class="logs"></div>
          <p><button type="button" class="log-more" hidden>Load more</button></p>
        </div>
        <div class="card wide timeline-card"><h2>Timeline</h2><div class="timeline"></div></div>
      </div>`;
  }

  bind() {
    this.$(".log-level").addEventListener("change", (e) => {
      this.logLevel = e.target.value;
      this.renderLogs();
    });
    this.$(".log-reload").addEventListener("click", () => this.loadLogs(true));
    this.$(".log-more").addEventListener("click", () => this.loadLogs(false));
    this.root.addEventListener("click", (e) => {
      if (e.target.classList.contains("cancel")) this.cancel(e.target);
    });
  }

  async cancel(button) {
    const reason = window.prompt(`Cancel ${this.id}? Reason (optional):`, "cancelled from the dashboard");
    if (reason === null) return;
    button.disabled = true;
    try {
      await post(`/v1/operations/${encodeURIComponent(this.id)}:cancel`, { reason });
    } catch (err) {
      if (this.closed) return;
      this.$(".op-status").innerHTML = `<div class="banner">Cancel failed: ${f.escape(err.message)}</div>`;
      button.disabled = false;
    }
  }

  mayCancel() {
    return this.me && this.me.methods.includes("CancelOperation");
  }

  // Once a second: the ETA and durations move on without events.
  tick() {
    if (this.op && f.ACTIVE.has(this.op.state)) this.renderHead();
  }

  render() {
    if (!this.op) return;
    this.renderHead();
    this.renderFacts();
    this.renderStages();
    this.renderNumbers();
    const op = this.op;
    this.$(".children-card").hidden = !(op.children && op.children.total);
    // Reload what the stream does not carry when it may have changed, at most
    // once a second each.
    if (op.revision !== this.seen.revision) {
      this.seen.revision = op.revision;
      this.soon("timeline", () => this.loadTimeline());
      if (op.children && op.children.total) this.soon("children", () => this.loadChildren());
    }
    if (op.errorCount !== this.seen.errors || op.warningCount !== this.seen.warnings) {
      this.seen.errors = op.errorCount;
      this.seen.warnings = op.warningCount;
      if (!this.logToken) this.soon("logs", () => this.loadLogs(true));
    }
  }

  // Runs load() now, or at the end of the current second when it ran less
  // than a second ago: never more often, and never missing the last change.
  soon(what, load) {
    if (this.timers[what]) return;
    const wait = Math.max(0, this.refreshAt[what] - Date.now());
    this.timers[what] = setTimeout(() => {
      this.timers[what] = null;
      this.refreshAt[what] = Date.now() + 1000;
      load();
    }, wait);
  }

  renderHead() {
    const op = this.op;
    const pct = f.percent(op);
    const eta = f.etaLeft(op);
    const cancel =
      this.mayCancel() && f.ACTIVE.has(op.state) && !op.cancelRequested && !this.deleted
        ? '<button type="button" class="danger cancel">Cancel</button>'
        : "";
    const status = this.deleted
      ? '<span class="badge alert">deleted</span>'
      : op.cancelRequested && f.ACTIVE.has(op.state)
        ? '<span class="badge alert">cancel requested</span>'
        : "";
    const stalled = op.stalled ? '<span class="badge stalled">stalled</span>' : "";
    const html = `
      <h1>${f.escape(op.kind)} <span class="mono">${f.escape(op.id)}</span></h1>
      <span class="state ${op.state}" data-state>${op.state}</span>${stalled}${status}
      <span class="progress"><span class="bar ${op.state}"><span style="width:${pct.toFixed(1)}%"></span></span>
        <span class="pct num">${pct.toFixed(1)}%</span></span>
      <span class="num">${eta === undefined ? "" : `ETA ${f.span(eta)}`}</span>
      ${cancel}
      <p class="muted message" style="flex-basis:100%;margin:0">${f.escape(op.message || "")}</p>`;
    const head = this.$(".op-head");
    if (head.dataset.html !== html) {
      head.dataset.html = html;
      head.innerHTML = html;
    }
  }

  renderFacts() {
    const op = this.op;
    const rows = [
      ["Project", op.project],
      ["Dataset", op.dataset],
      ["Labels", f.labels(op)],
      [
        "Parent",
        op.parentId
          ? `<a href="#/op/${encodeURIComponent(op.parentId)}">${f.escape(op.parentId)}</a>`
          : "",
        true,
      ],
      ["Done", f.done(op)],
      ["Throughput", f.rate(op.throughput, op.throughputUnit)],
      ["ETA confidence", op.etaConfidence ? `${Math.round(op.etaConfidence * 100)}%` : ""],
      ["Created", f.time(op.createdAt)],
      ["Started", f.time(op.startedAt)],
      ["Updated", `${f.time(op.updatedAt)} (${f.ago(op.updatedAt)})`],
      ["Finished", f.time(op.finishedAt)],
      ["Checkpoint", op.checkpoint],
      ["Paused", op.pauseReason],
      ["Cancel reason", op.cancelReason],
      ["Errors / warnings", `${f.count(op.errorCount)} / ${f.count(op.warningCount)}`],
      ["Revision", op.revision],
    ];
    let html = rows
      .filter(([, value]) => value)
      .map(([name, value, raw]) => `<dt>${name}</dt><dd>${raw ? value : f.escape(value)}</dd>`)
      .join("");
    if (op.error) {
      const e = op.error;
      html += `<dt>Error</dt><dd class="error-text"><b>${f.escape(e.code || "")}</b> ${f.escape(e.message || "")}
        ${e.stage ? `<span class="muted">in ${f.escape(e.stage)}</span>` : ""}
        ${e.item ? `<span class="muted">at ${f.escape(e.item)}</span>` : ""}</dd>`;
    }
    for (const alert of op.alerts || []) {
      html += `<dt>Alert</dt><dd><span class="badge alert">${f.escape(alert.type)}</span> ${f.escape(alert.message)}</dd>`;
    }
    this.$(".facts").innerHTML = html;
    this.$(".facts-card").classList.toggle("error", Boolean(op.error));
  }

  renderStages() {
    const stages = this.op.stages || [];
    if (!stages.length) {
      this.$(".stages").innerHTML = '<p class="muted">No stage plan.</p>';
      return;
    }
    const now = Date.now();
    const body = stages
      .map((s) => {
        let seconds = f.seconds(s.duration);
        if (seconds === undefined && s.startedAt && s.state === "RUNNING") {
          seconds = (now - f.ms(s.startedAt)) / 1000;
        }
        const done = f.num(s.total) ? `${f.count(s.completed)} / ${f.count(s.total)}` : f.count(s.completed);
        return `<tr data-stage="${f.escape(s.name)}"><td>${f.escape(s.name)}</td>
          <td class="state ${s.state === "DONE" ? "SUCCEEDED" : s.state}">${s.state}</td>
          <td class="num">${done}</td><td class="num">${f.span(seconds)}</td>
          <td class="num">${f.rate(s.rate, "")}</td><td class="num">${s.weight ?? ""}</td></tr>`;
      })
      .join("");
    this.$(".stages").innerHTML = `<table class="plain"><thead><tr><th>Stage</th><th>State</th>
      <th class="num">Done</th><th class="num">Took</th><th class="num">Rate</th><th class="num">Weight</th></tr></thead>
      <tbody>${body}</tbody></table>`;
  }

  renderNumbers() {
    const op = this.op;
    const rows = [
      ...Object.entries(op.counters || {}).map(([k, v]) => [k, f.count(v), "counter"]),
      ...Object.entries(op.measures || {}).map(([k, v]) => [k, f.count(v), "measure"]),
    ];
    this.$(".numbers").innerHTML = rows.length
      ? `<table class="plain"><tbody>${rows
          .map(([k, v, what]) => `<tr><td>${f.escape(k)}</td><td class="muted small">${what}</td><td class="num">${v}</td></tr>`)
          .join("")}</tbody></table>`
      : '<p class="muted">None reported.</p>';
  }

  async loadTimeline() {
    try {
      const body = await get(`/v1/operations/${encodeURIComponent(this.id)}/timeline`);
      this.timeline = body.entries || [];
    } catch {
      return; // the stream says what is wrong
    }
    if (this.closed) return;
    this.$(".timeline").innerHTML = `<table class="plain"><tbody>${this.timeline
      .slice()
      .reverse()
      .map(
        (e) => `<tr><td class="muted">${f.time(e.time)}</td><td>${f.escape(e.type)}</td>
          <td>${f.escape(e.stage || "")}</td><td>${f.escape(e.message || "")}</td></tr>`,
      )
      .join("")}</tbody></table>`;
  }

  async loadChildren() {
    try {
      const body = await get(`/v1/operations?parentId=${encodeURIComponent(this.id)}&pageSize=500`);
      this.children = body.operations || [];
    } catch {
      return;
    }
    if (this.closed) return;
    const summary = (this.op.children && this.op.children.byState) || {};
    const parts = Object.entries(summary).map(([s, n]) => `<span class="state ${s}">${n} ${s.toLowerCase()}</span>`);
    const list = this.children
      .map(
        (c) => `<tr><td><a href="#/op/${encodeURIComponent(c.id)}">${f.escape(c.kind)}</a>
          <span class="mono muted">${f.escape(c.id)}</span></td>
          <td class="state ${c.state}">${c.state}</td><td class="num">${f.percent(c).toFixed(0)}%</td></tr>`,
      )
      .join("");
    this.$(".children").innerHTML = `<p>${parts.join(" · ")}</p>
      <table class="plain"><tbody>${list}</tbody></table>`;
  }

  async loadLogs(fresh) {
    const token = fresh ? "" : this.logToken;
    let body;
    try {
      const query = new URLSearchParams({ pageSize: String(LOG_PAGE) });
      if (token) query.set("pageToken", token);
      body = await get(`/v1/operations/${encodeURIComponent(this.id)}/logs?${query}`);
    } catch {
      return;
    }
    if (this.closed) return;
    this.logs = fresh ? body.entries || [] : this.logs.concat(body.entries || []);
    this.logToken = body.nextPageToken || "";
    this.dropped = f.num(body.dropped);
    this.renderLogs();
  }

  renderLogs() {
    const floor = this.logLevel ? LEVELS.indexOf(this.logLevel) : -1;
    const shown = this.logs.filter((e) => LEVELS.indexOf(e.level) >= floor);
    const rows = shown
      .map(
        (e) => `<tr class="log" data-level="${e.level}"><td class="muted">${f.time(e.time)}</td>
          <td class="level ${e.level}">${e.level}</td><td>${f.escape(e.stage || "")}</td>
          <td>${f.escape(e.message)}${e.item ? ` <span class="muted">(${f.escape(e.item)})</span>` : ""}</td></tr>`,
      )
      .join("");
    const dropped = this.dropped ? `<p class="muted small">${this.dropped} older entries were dropped.</p>` : "";
    this.$(".logs").innerHTML = shown.length
      ? `${dropped}<table class="plain"><tbody>${rows}</tbody></table>`
      : `${dropped}<p class="muted">No log entries${this.logLevel ? " at this level" : ""}.</p>`;
    this.$(".log-more").hidden = !this.logToken;
  }
}
