// The dashboard: one live stream of every operation this token may see, a
// project list and a table of operations kept in the browser, and an
// operation's own page (operation.js). Routes live in the URL hash:
//   #/?project=web&state=active&kind=&label=&q=&sort=created
//   #/op/<operation id>
import { ApiError, get, LiveStream, setToken, token } from "./api.js";
import * as f from "./format.js";
import { OperationPage } from "./operation.js";
import { OperationTable } from "./table.js";

const $ = (id) => document.getElementById(id);

const app = {
  me: null,
  operations: new Map(), // id -> Operation (proto3 JSON)
  loading: null, // a snapshot being received: swapped in at SYNCED
  stream: null,
  table: null,
  page: null,
  dirty: true,
};

// --- the live stream -----------------------------------------------------------------

function onEvent(type, event) {
  const op = event.operation;
  if (op) {
    // Numbers once per event, not in every comparison of every sort.
    op.createdRevision_ = f.num(op.createdRevision);
    op.revision_ = f.num(op.revision);
  }
  switch (type) {
    case "reset":
      // The server cannot resume from where we were (restarted on a memory
      // store, or history gone): a fresh snapshot follows; keep showing the old
      // state until it is complete.
      app.loading = new Map();
      return;
    case "snapshot":
      if (!app.loading) app.loading = new Map();
      app.loading.set(op.id, op);
      return;
    case "synced":
      if (app.loading) {
        app.operations = app.loading;
        app.loading = null;
      }
      break;
    case "changed":
      (app.loading || app.operations).set(op.id, op);
      break;
    case "deleted":
      (app.loading || app.operations).delete(op.id);
      break;
    default: // bookmark: nothing changed
      return;
  }
  app.dirty = true;
  if (app.page && op) app.page.fromList(op, type);
}

function setConnection(state, detail) {
  const pill = $("connection");
  const names = { live: "live", connecting: "connecting…", retrying: "reconnecting…" };
  pill.textContent = names[state] || state;
  pill.className = `pill ${state}`;
  pill.title = detail ? String(detail.message || detail) : "";
}

function connect() {
  if (app.stream) app.stream.close();
  app.stream = new LiveStream("/v1/operations:watch", {
    onEvent,
    onStatus: setConnection,
    onAuth: (err) => signIn(err.message),
  });
}

// --- signing in ---------------------------------------------------------------------

function signIn(why) {
  if (app.stream) app.stream.close();
  app.stream = null;
  $("login-why").textContent = why || "This server asks for a token.";
  const dialog = $("login");
  if (!dialog.open) dialog.showModal();
}

$("login-form").addEventListener("submit", () => {
  setToken($("login-token").value.trim());
  $("login-token").value = "";
  start();
});

$("signout").addEventListener("click", () => {
  setToken("");
  location.reload();
});

async function start() {
  try {
    app.me = await get("/v1/me");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      signIn(token() ? `That token was refused: ${err.message}` : err.message);
      return;
    }
    setConnection("retrying", err);
    setTimeout(start, 2000); // the server is not up yet
    return;
  }
  $("who").textContent = app.me.authenticated ? `signed in as ${app.me.name}` : "";
  $("signout").hidden = !token();
  connect();
  route();
}

// --- theme ------------------------------------------------------------------------

function applyTheme() {
  const theme = localStorage.getItem("headway-theme") || "";
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
  $("theme").title = `Theme: ${theme || "as the system"} (click to change)`;
}
$("theme").addEventListener("click", () => {
  const order = ["", "light", "dark"];
  const now = localStorage.getItem("headway-theme") || "";
  localStorage.setItem("headway-theme", order[(order.indexOf(now) + 1) % order.length]);
  applyTheme();
});
applyTheme();

// --- the list view -------------------------------------------------------------------

function query() {
  const hash = location.hash.replace(/^#\/?/, "");
  if (hash.startsWith("op/")) return null;
  return new URLSearchParams(hash.replace(/^\?/, ""));
}

function setQuery(changes) {
  const params = query() || new URLSearchParams();
  for (const [key, value] of Object.entries(changes)) {
    if (value) params.set(key, value);
    else params.delete(key);
  }
  const text = params.toString();
  history.replaceState(null, "", `#/${text ? `?${text}` : ""}`);
  syncFilters(params);
  app.dirty = true;
}

// Each filter control and its key in the URL.
const FILTERS = [
  ["f-search", "q"],
  ["f-state", "state"],
  ["f-kind", "kind"],
  ["f-label", "label"],
  ["f-sort", "sort"],
];

function syncFilters(params) {
  for (const [id, key] of FILTERS) $(id).value = params.get(key) || "";
  if (!$("f-sort").value) $("f-sort").value = "created";
}

$("filters").addEventListener("submit", (event) => event.preventDefault());
for (const [id, key] of FILTERS) {
  $(id).addEventListener("input", () => setQuery({ [key]: $(id).value }));
}
for (const state of f.STATES) {
  $("f-state").append(new Option(state[0] + state.slice(1).toLowerCase(), state));
}
document.querySelectorAll(".row.head [data-sort]").forEach((cell) => {
  cell.addEventListener("click", () => setQuery({ sort: cell.dataset.sort }));
});

function matcher(params) {
  const project = params.get("project");
  const state = params.get("state");
  const kind = params.get("kind");
  const search = (params.get("q") || "").toLowerCase();
  const [labelKey, labelValue] = (params.get("label") || "").split("=");
  return (op) => {
    if (project !== null && op.project !== project && !(project === "" && !op.project)) {
      return false;
    }
    if (state === "active" ? !f.ACTIVE.has(op.state) : state && op.state !== state) return false;
    if (kind && op.kind !== kind) return false;
    if (labelKey) {
      const value = (op.labels || {})[labelKey];
      if (value === undefined || (labelValue !== undefined && value !== labelValue)) return false;
    }
    if (search) {
      const text = `${op.id} ${op.kind} ${op.stage || ""} ${op.message || ""}`.toLowerCase();
      if (!text.includes(search)) return false;
    }
    return true;
  };
}

const ORDER = Object.fromEntries(f.STATES.map((s, i) => [s, i]));
const SORTS = {
  created: (a, b) => b.createdRevision_ - a.createdRevision_,
  updated: (a, b) => b.revision_ - a.revision_,
  progress: (a, b) => f.percent(b) - f.percent(a),
  eta: (a, b) => (f.etaLeft(a) ?? Infinity) - (f.etaLeft(b) ?? Infinity),
  state: (a, b) => ORDER[a.state] - ORDER[b.state],
  kind: (a, b) => (a.kind < b.kind ? -1 : a.kind > b.kind ? 1 : 0),
};

function renderProjects(params) {
  const projects = new Map();
  for (const op of app.operations.values()) {
    const entry = projects.get(op.project || "") || { total: 0, active: 0 };
    entry.total += 1;
    if (f.ACTIVE.has(op.state)) entry.active += 1;
    projects.set(op.project || "", entry);
  }
  const current = params ? params.get("project") : null;
  const link = (name, label, counts) => {
    const target = new URLSearchParams();
    if (name !== null) target.set("project", name);
    const cls = current === name ? "current" : "";
    return `<a href="#/?${target}" class="${cls}" data-project="${f.escape(name ?? "*")}">
      <span>${f.escape(label)}</span><span class="muted">${counts}</span></a>`;
  };
  const html = [
    "<h3>Projects</h3>",
    link(null, "All projects", app.operations.size),
    ...[...projects.keys()].sort().map((name) => {
      const { active, total } = projects.get(name);
      return link(name, name || "(none)", `<span title="active">${active}</span>/${total}`);
    }),
  ].join("");
  if ($("projects").innerHTML !== html) $("projects").innerHTML = html;
}

function renderList(params) {
  const match = matcher(params);
  const shown = [];
  const byState = {};
  const kinds = new Set();
  for (const op of app.operations.values()) {
    kinds.add(op.kind);
    if (match(op)) {
      shown.push(op);
      byState[op.state] = (byState[op.state] || 0) + 1;
    }
  }
  const sort = params.get("sort") || "created";
  shown.sort(SORTS[sort] || SORTS.created);
  document.querySelectorAll(".row.head [data-sort]").forEach((cell) => {
    cell.classList.toggle("sorted", cell.dataset.sort === sort);
  });
  const kindSelect = $("f-kind");
  const known = new Set([...kindSelect.options].map((o) => o.value));
  for (const kind of [...kinds].sort()) {
    if (!known.has(kind)) kindSelect.append(new Option(kind, kind));
  }
  kindSelect.value = params.get("kind") || "";
  $("summary").innerHTML = f.STATES.map(
    (s) => `<span><b class="state ${s}" data-count="${s}">${(byState[s] || 0).toLocaleString("en-US")}</b>
      <span class="muted">${s.toLowerCase()}</span></span>`,
  ).join("");
  $("shown").textContent = `${shown.length.toLocaleString("en-US")} of ${app.operations.size.toLocaleString("en-US")}`;
  $("empty").hidden = shown.length > 0;
  app.table.show(shown);
}

// --- routing and the frame loop ------------------------------------------------------

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  if (hash.startsWith("op/")) {
    const id = decodeURIComponent(hash.slice(3));
    $("list-view").hidden = true;
    $("op-view").hidden = false;
    if (!app.page || app.page.id !== id) {
      if (app.page) app.page.close();
      app.page = new OperationPage($("op-view"), id, app.me, app.operations.get(id));
    }
  } else {
    if (app.page) app.page.close();
    app.page = null;
    $("op-view").hidden = true;
    $("list-view").hidden = false;
    syncFilters(query());
  }
  app.dirty = true;
}
window.addEventListener("hashchange", route);

// Everything is drawn here, at most once per animation frame however fast
// events arrive; the ETA column counts down once a second without events.
let lastTick = 0;
function frame(now) {
  if (now - lastTick > 1000) {
    lastTick = now;
    app.dirty = true;
    if (app.page) app.page.tick();
  }
  if (app.dirty && app.me) {
    app.dirty = false;
    const params = query();
    renderProjects(params);
    if (params) renderList(params);
  }
  requestAnimationFrame(frame);
}

app.table = new OperationTable($("viewport"), $("spacer"));
requestAnimationFrame(frame);
start();
