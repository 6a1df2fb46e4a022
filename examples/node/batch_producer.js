#!/usr/bin/env node
'use strict';
// A Headway producer for many operations at once (the shards of a batch job):
// starts COUNT operations, then each round reports on all of them in
// BatchUpdateOperations calls (at most 1000 reports a call), reads each
// report's own ack, retries the last round whole to show that the server
// applies nothing twice, and completes them all.
// Prints one JSON line per step on stdout; errors go to stderr as JSON.
//
//   node batch_producer.js ADDRESS [PROJECT] [--count N] [--rounds N] [--interval-ms N]
//                          [--include-unknown]

const { parseArgs } = require('node:util');
const { grpc, createClient, unary, emit, runMain } = require('./headway');

const USAGE =
  'usage: node batch_producer.js ADDRESS [PROJECT] [--count N] [--rounds N] [--interval-ms N]\n' +
  '                              [--include-unknown]\n' +
  '  ADDRESS            host:port of a Headway server, e.g. 127.0.0.1:50051\n' +
  '  PROJECT            project of the operations (default "node-batch")\n' +
  '  --count N          operations to start and report on (default 50)\n' +
  '  --rounds N         reports per operation, one round each (default 4)\n' +
  '  --interval-ms N    pause between rounds (default 200)\n' +
  '  --include-unknown  add a report for an operation that does not exist to the first\n' +
  '                     round: the server rejects it alone and applies the others\n';

const KIND = 'node-batch';
// The server's limit (progress.proto): more reports per call is INVALID_ARGUMENT.
const MAX_BATCH_REPORTS = 1000;

function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      count: { type: 'string', default: '50' },
      rounds: { type: 'string', default: '4' },
      'interval-ms': { type: 'string', default: '200' },
      'include-unknown': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  const count = Number(values.count);
  const rounds = Number(values.rounds);
  const intervalMs = Number(values['interval-ms']);
  const valid =
    Number.isInteger(count) &&
    count >= 1 &&
    Number.isInteger(rounds) &&
    rounds >= 1 &&
    intervalMs >= 0;
  if (values.help || !valid || positionals.length < 1 || positionals.length > 2) {
    return null;
  }
  return {
    address: positionals[0],
    project: positionals[1] || 'node-batch',
    count,
    rounds,
    intervalMs,
    includeUnknown: values['include-unknown'],
  };
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Sends reports in calls of at most MAX_BATCH_REPORTS and resolves with one ack
 * per report, in order: {sequence, operation_id, result, error_code, error_message}.
 * `calls` counts the calls made. A server without BatchUpdateOperations
 * (UNIMPLEMENTED) gets unary UpdateOperation calls instead, acked the same way.
 */
async function sendReports(client, reports, state) {
  const acks = [];
  for (let start = 0; start < reports.length; start += MAX_BATCH_REPORTS) {
    const chunk = reports.slice(start, start + MAX_BATCH_REPORTS);
    if (!state.unary) {
      try {
        const response = await unary(client, 'BatchUpdateOperations', { updates: chunk });
        state.calls += 1;
        acks.push(...response.results);
        continue;
      } catch (error) {
        if (error.code !== grpc.status.UNIMPLEMENTED) {
          throw error;
        }
        state.unary = true; // an older server: report one by one from now on
      }
    }
    for (const report of chunk) {
      state.calls += 1;
      try {
        const result = await unary(client, 'UpdateOperation', report);
        acks.push({ sequence: report.sequence, operation_id: report.operation_id, result });
      } catch (error) {
        if (typeof error.code !== 'number' || error.code === grpc.status.UNAVAILABLE) {
          throw error;
        }
        acks.push({
          sequence: report.sequence,
          operation_id: report.operation_id,
          error_code: error.code,
          error_message: error.details,
        });
      }
    }
  }
  return acks;
}

function roundRecord(step, round, reports, acks, calls) {
  const rejected = acks
    .filter((ack) => ack.error_code)
    .map((ack) => ({
      operation_id: ack.operation_id,
      code: grpc.status[ack.error_code] || 'UNKNOWN',
    }));
  const accepted = acks.filter((ack) => !ack.error_code);
  return {
    step,
    round,
    calls,
    reports: reports.length,
    applied: accepted.filter((ack) => ack.result.applied).length,
    rejected,
    percent: accepted.length ? Math.min(...accepted.map((ack) => ack.result.percent)) : 0,
  };
}

async function run(options) {
  const client = createClient(options.address);
  try {
    const tag = `${process.pid}-${Date.now()}`;
    const operations = await Promise.all(
      Array.from({ length: options.count }, (_, i) =>
        unary(client, 'StartOperation', {
          kind: KIND,
          project: options.project,
          labels: { client: 'node', shard: String(i) },
          total: options.rounds,
          unit: 'files',
          // With a server-picked id, request_id makes a retried start idempotent.
          request_id: `node-batch-${tag}-${i}`,
        }),
      ),
    );
    const ids = operations.map((operation) => operation.id);
    emit({ step: 'started', project: options.project, count: ids.length, ids });

    const state = { unary: false, calls: 0 };
    const active = new Set(ids); // operations still reporting (not cancelled)
    let last = null;
    for (let round = 1; round <= options.rounds; round += 1) {
      await sleep(options.intervalMs);
      // One report per operation: absolute completed, counter deltas, and the
      // round as its sequence (increasing per operation).
      const reports = [...active].map((id) => ({
        operation_id: id,
        sequence: round,
        completed: round,
        counters: { files: 1 },
        message: `round ${round}/${options.rounds}`,
      }));
      if (round === 1 && options.includeUnknown) {
        reports.push({ operation_id: `missing-${tag}`, sequence: 1, completed: 1 });
      }
      const before = state.calls;
      const acks = await sendReports(client, reports, state);
      emit(roundRecord('batch', round, reports, acks, state.calls - before));
      // Each ack carries its operation's cancel_requested: acknowledge those.
      for (const ack of acks) {
        if (!ack.error_code && ack.result.cancel_requested && active.has(ack.operation_id)) {
          active.delete(ack.operation_id);
          await unary(client, 'FailOperation', {
            operation_id: ack.operation_id,
            error: { code: 'CANCELLED', message: 'cancelled on request' },
            request_id: `${ack.operation_id}-cancelled`,
          });
          emit({ step: 'cancelled', id: ack.operation_id });
        }
      }
      last = { round, reports: reports.filter((report) => active.has(report.operation_id)) };
    }

    // A network retry of the whole last call: same sequences, so every report is
    // acknowledged applied=false and no counter is added twice.
    const before = state.calls;
    const retried = await sendReports(client, last.reports, state);
    emit(roundRecord('retried', last.round, last.reports, retried, state.calls - before));

    const ended = await Promise.all(
      [...active].map((id) =>
        unary(client, 'CompleteOperation', {
          operation_id: id,
          message: 'done',
          request_id: `${id}-complete`,
        }),
      ),
    );
    const states = {};
    for (const operation of ended) {
      states[operation.state] = (states[operation.state] || 0) + 1;
    }
    emit({ step: 'completed', count: ended.length, states, calls: state.calls });
    return 0;
  } finally {
    client.close();
  }
}

runMain({ parse, usage: USAGE, run });
