'use strict';
// A best-effort progress tracker for Node producers: the same policy as the Python
// client's default. Tracking never breaks the job:
//
// - the operation gets its id here (`op-` + 32 hex digits; the server accepts a
//   client-chosen id), so starting it can be retried until the server answers;
// - update() never waits on the network and never throws for an outage: it keeps the
//   latest absolute values and the counter totals (bounded: no queue of reports), and
//   a background loop sends them at most every `minIntervalMs`;
// - an unreachable or slow server (UNAVAILABLE, DEADLINE_EXCEEDED, ...) is retried with
//   exponential backoff and full jitter; one warning when the outage starts, one when
//   it ends (JSON lines on stderr);
// - NOT_FOUND (a server restarted with an empty store) registers the operation again
//   with the same id and parameters, then sends its whole state: counters stay exact
//   (a report whose answer was lost is resent with its sequence, never re-added);
// - NOT_FOUND with the trailing metadata `headway-deleted: true` (deleted on purpose)
//   stops reporting: the operation stays deleted;
// - `cancelRequested` follows the server, as before;
// - finish() waits at most `finishTimeoutMs`, then gives up with one warning.
// A report the server rejects as invalid (the caller's bug) is thrown by the next update().

const crypto = require('node:crypto');
const { grpc, unary } = require('./headway');

const { status } = grpc;
// Statuses that say the request is wrong, not that the tracker is out of reach.
const CALLER_ERRORS = new Set([
  status.INVALID_ARGUMENT,
  status.FAILED_PRECONDITION,
  status.ALREADY_EXISTS,
  status.OUT_OF_RANGE,
]);
const DELETED_KEY = 'headway-deleted';

/** A pause that does not keep the process alive on its own (the job decides when to exit). */
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}

/** Waits for `promise`, at most `ms`, keeping the process alive meanwhile (the job waits). */
async function within(promise, ms) {
  let timer;
  const timeout = new Promise((resolve) => {
    timer = setTimeout(resolve, ms);
  });
  try {
    await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function warn(message, extra = {}) {
  process.stderr.write(`${JSON.stringify({ warning: message, ...extra })}\n`);
}

function isDeleted(error) {
  const values = error.metadata ? error.metadata.get(DELETED_KEY) : [];
  return error.code === status.NOT_FOUND && values.includes('true');
}

class Tracker {
  /**
   * @param client a ProgressTracker client (headway.createClient)
   * @param start the StartOperationRequest; operation_id is chosen here when empty
   */
  constructor(
    client,
    start,
    { deadlineMs = 2000, minIntervalMs = 200, maxBackoffMs = 5000, finishTimeoutMs = 5000 } = {},
  ) {
    this.client = client;
    this.start = {
      ...start,
      operation_id: start.operation_id || `op-${crypto.randomBytes(16).toString('hex')}`,
    };
    this.id = this.start.operation_id;
    this.options = { deadlineMs, minIntervalMs, maxBackoffMs, finishTimeoutMs };
    this.registered = false;
    this.deleted = false;
    this.cancelRequested = false;
    this.sequence = 0;
    this.latest = {}; // absolute values: completed, stage, message, ...
    this.totals = {}; // counter totals reported by the job
    this.applied = {}; // counter totals the server has applied
    this.unacked = null; // { request, totals } sent, answer not received
    this.dirty = false;
    this.error = null;
    this.downSince = null;
    this.backoffMs = 0;
    this.loop = null;
    this.closed = false;
  }

  /** The server has registered the operation and has everything reported so far. */
  get delivered() {
    return this.registered && !this.dirty && this.unacked === null;
  }

  get connected() {
    return this.delivered && this.downSince === null;
  }

  /** Records absolute values and counter deltas; never waits, never throws for an outage. */
  update({ counters = {}, ...absolute } = {}) {
    if (this.error !== null) {
      const error = this.error;
      this.error = null;
      throw error;
    }
    for (const [name, delta] of Object.entries(counters)) {
      if (!(delta >= 0)) {
        throw new RangeError(`counters: ${name} delta must not be negative`);
      }
      this.totals[name] = (this.totals[name] || 0) + delta;
    }
    Object.assign(this.latest, absolute);
    this.dirty = true;
    this.kick();
  }

  kick() {
    if (this.loop === null && !this.deleted && !this.closed) {
      this.loop = this.run().finally(() => {
        this.loop = null;
      });
    }
  }

  async run() {
    while (
      !this.deleted &&
      !this.closed &&
      (this.dirty || this.unacked !== null || !this.registered)
    ) {
      try {
        await this.sendOnce();
        this.answered();
        await sleep(this.options.minIntervalMs);
      } catch (error) {
        await this.failed(error);
      }
    }
  }

  answered() {
    if (this.downSince !== null) {
      warn('Headway answers again; sending the progress kept', {
        after_ms: Date.now() - this.downSince,
      });
      this.downSince = null;
    }
    this.backoffMs = 0;
  }

  async sendOnce() {
    const { deadlineMs } = this.options;
    if (!this.registered) {
      const op = await unary(this.client, 'StartOperation', this.start, { timeoutMs: deadlineMs });
      this.registered = true;
      this.cancelRequested = this.cancelRequested || op.cancel_requested;
    }
    if (this.unacked === null) {
      if (!this.dirty) {
        return;
      }
      const counters = {};
      for (const [name, total] of Object.entries(this.totals)) {
        if (total > (this.applied[name] || 0)) {
          counters[name] = total - (this.applied[name] || 0);
        }
      }
      this.sequence += 1;
      const request = { operation_id: this.id, sequence: this.sequence, ...this.latest, counters };
      this.unacked = { request, totals: { ...this.totals } };
      this.dirty = false;
    }
    // Resent unchanged until answered: its sequence makes the server apply it once.
    const response = await unary(this.client, 'UpdateOperation', this.unacked.request, {
      timeoutMs: deadlineMs,
    });
    this.applied = this.unacked.totals;
    this.unacked = null;
    this.cancelRequested = this.cancelRequested || response.cancel_requested;
  }

  async failed(error, deadline = Infinity) {
    if (isDeleted(error)) {
      this.deleted = true;
      warn('the operation was deleted on the server; no longer reporting', { id: this.id });
    } else if (error.code === status.NOT_FOUND) {
      // The server lost it (restarted empty): register again, then send everything.
      warn('the operation is unknown to the server (restarted?); registering it again', {
        id: this.id,
      });
      this.registered = false;
      this.applied = {};
      this.unacked = null;
      this.dirty = true;
    } else if (CALLER_ERRORS.has(error.code)) {
      this.error = error; // the job's bug: thrown by its next update()
      this.unacked = null;
    } else {
      if (this.downSince === null) {
        this.downSince = Date.now();
        warn('cannot reach Headway; progress is kept and sent when it answers', {
          code: grpc.status[error.code] || 'UNKNOWN',
        });
      }
      this.backoffMs = Math.min(this.options.maxBackoffMs, Math.max(100, this.backoffMs * 2));
      await sleep(Math.min(Math.random() * this.backoffMs, Math.max(0, deadline - Date.now())));
    }
  }

  /**
   * Sends what is kept, then `method` (CompleteOperation or FailOperation) with `request`;
   * resolves with the operation, or null when the server did not take it in time.
   */
  async finish(method, request) {
    const deadline = Date.now() + this.options.finishTimeoutMs;
    const ending = { operation_id: this.id, request_id: `${this.id}-end`, ...request };
    while (!this.deleted && Date.now() < deadline) {
      this.kick();
      if (this.loop !== null) {
        await within(this.loop, Math.max(0, deadline - Date.now()));
      }
      if (!this.delivered || Date.now() >= deadline) {
        continue;
      }
      try {
        const timeoutMs = Math.min(this.options.deadlineMs, Math.max(1, deadline - Date.now()));
        const op = await unary(this.client, method, ending, { timeoutMs });
        this.answered();
        this.closed = true;
        return op;
      } catch (error) {
        if (CALLER_ERRORS.has(error.code)) {
          // E.g. FAILED_PRECONDITION: it already ended (cancelled while queued).
          warn('the operation was not ended here', { id: this.id, details: error.details });
          break;
        }
        await within(this.failed(error, deadline), Math.max(0, deadline - Date.now()));
      }
    }
    this.closed = true; // nothing more is sent: the job may exit
    if (!this.deleted) {
      warn('the operation could not be ended on the server in time; giving up', { id: this.id });
    }
    return null;
  }
}

module.exports = { Tracker };
