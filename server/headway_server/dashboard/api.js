// The HTTP API as the dashboard uses it: JSON calls and live streams, both
// with the bearer token the user gave (kept for this browser tab only).
//
// Streams use fetch() and read Server-Sent Events from the body, not
// EventSource: EventSource cannot send an Authorization header, and a
// long-lived token must not travel in a URL (logs, history, Referer).

const TOKEN_KEY = "headway-token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function headers(extra = {}) {
  const all = { ...extra };
  const t = token();
  if (t) all.Authorization = `Bearer ${t}`;
  return all;
}

async function failure(response) {
  let code = "UNKNOWN";
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.status || code;
      message = body.error.message || message;
    }
  } catch {
    // not JSON: a proxy's page, say; the status line is all there is
  }
  return new ApiError(response.status, code, message);
}

export async function call(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.json();
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body || {});

// A live SSE stream that reconnects by itself and resumes where it left off
// (Last-Event-ID), the way EventSource would, with the token in a header.
// onEvent(type, data) gets every event; onStatus(state, detail) hears
// "connecting", "live", "retrying" (with the error) and "closed".
export class LiveStream {
  constructor(path, { onEvent, onStatus = () => {}, onAuth = () => {} }) {
    this.path = path;
    this.onEvent = onEvent;
    this.onStatus = onStatus;
    this.onAuth = onAuth;
    this.lastId = "";
    this.retryMs = 1000;
    this.closed = false;
    this.controller = null;
    this.failures = 0;
    this.run();
  }

  close() {
    this.closed = true;
    if (this.controller) this.controller.abort();
    this.onStatus("closed");
  }

  async run() {
    while (!this.closed) {
      this.onStatus("connecting");
      let error = null;
      try {
        await this.once();
      } catch (err) {
        error = err;
      }
      if (this.closed) return;
      if (error instanceof ApiError && error.status === 401) {
        this.onAuth(error);
        return; // the page asks for a token, then opens a new stream
      }
      if (error instanceof ApiError && error.status < 500 && error.status !== 429) {
        this.onStatus("failed", error);
        return; // retrying the same request cannot help
      }
      this.failures += 1;
      // The server's retry hint, backing off to 10 s while it stays away.
      const wait = Math.min(this.retryMs * Math.min(this.failures, 10), 10000);
      this.onStatus("retrying", error || new Error("stream ended"));
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  async once() {
    this.controller = new AbortController();
    const extra = { Accept: "text/event-stream" };
    if (this.lastId) extra["Last-Event-ID"] = this.lastId;
    const response = await fetch(this.path, {
      headers: headers(extra),
      signal: this.controller.signal,
      cache: "no-store",
    });
    if (!response.ok) throw await failure(response);
    if (response.status === 204) {
      // Nothing more will come (an operation that ended, seen to its end).
      this.closed = true;
      this.onStatus("ended");
      return;
    }
    this.onStatus("live");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let event = { type: "message", data: [], id: null };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let newline;
      while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
        if (line === "") {
          if (event.id !== null) this.lastId = event.id;
          if (event.data.length) {
            this.failures = 0;
            this.onEvent(event.type, JSON.parse(event.data.join("\n")));
          }
          event = { type: "message", data: [], id: null };
          continue;
        }
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event.type = text;
        else if (field === "data") event.data.push(text);
        else if (field === "id") event.id = text;
        else if (field === "retry" && /^\d+$/.test(text)) this.retryMs = Number(text);
      }
    }
  }
}
