#!/usr/bin/env node
'use strict';
// A Headway producer: starts an operation with a stage plan, reports progress
// with increasing sequence numbers, counter deltas and a measure (cost_usd, an
// absolute value summed over children), shows that a retried report is
// acknowledged without double-counting, then completes it.
// Prints one JSON line per step on stdout; errors go to stderr as JSON.
//
//   node producer.js ADDRESS [PROJECT] [--id OPERATION_ID] [--wait] [--interval-ms N]

const readline = require('node:readline');
const { parseArgs } = require('node:util');
const { grpc, createClient, unary, emit, runMain } = require('./headway');

const USAGE =
  'usage: node producer.js ADDRESS [PROJECT] [--id OPERATION_ID] [--wait] [--interval-ms N]\n' +
  '  ADDRESS          host:port of a Headway server, e.g. 127.0.0.1:50051\n' +
  '  PROJECT          project of the operation (default "node-demo")\n' +
  '  --id ID          operation id to use (default: the server picks one)\n' +
  '  --wait           after starting, wait for a line (Enter) on stdin before reporting,\n' +
  '                   so a watcher can be attached first\n' +
  '  --interval-ms N  pause between reports (default 200)\n';

const KIND = 'node-demo';
const STAGES = [
  { name: 'fetch', weight: 1 },
  { name: 'process', weight: 3 },
];
// Measures: named numbers with how they combine over a parent's children.
const MEASURES = [{ name: 'cost_usd', aggregation: 'SUM' }];
// Absolute stage progress and measures; counters are deltas added by the server.
// Percent = (finished stages' weights + current weight * completed/total) / 4.
const REPORTS = [
  {
    stage: 'fetch',
    stage_completed: 1,
    stage_total: 1,
    counters: { fetched: 3 },
    measures: { cost_usd: 0.25 },
  },
  {
    stage: 'process',
    stage_completed: 1,
    stage_total: 3,
    counters: { processed: 1 },
    measures: { cost_usd: 0.5 },
  },
  {
    stage: 'process',
    stage_completed: 2,
    stage_total: 3,
    counters: { processed: 1 },
    measures: { cost_usd: 0.75 },
  },
  {
    stage: 'process',
    stage_completed: 3,
    stage_total: 3,
    counters: { processed: 1 },
    measures: { cost_usd: 1.25 },
  },
];

function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      id: { type: 'string' },
      wait: { type: 'boolean', default: false },
      'interval-ms': { type: 'string', default: '200' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  const intervalMs = Number(values['interval-ms']);
  if (values.help || positionals.length < 1 || positionals.length > 2 || !(intervalMs >= 0)) {
    return null;
  }
  return {
    address: positionals[0],
    project: positionals[1] || 'node-demo',
    operationId: values.id || '',
    wait: values.wait,
    intervalMs,
  };
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Resolves on the first line of stdin, or when stdin ends. */
function waitForLine() {
  if (process.stdin.isTTY) {
    process.stderr.write('press Enter to start reporting\n');
  }
  return new Promise((resolve) => {
    const lines = readline.createInterface({ input: process.stdin });
    let done = false;
    const finish = () => {
      if (!done) {
        done = true;
        lines.close();
        resolve();
      }
    };
    lines.once('line', finish);
    lines.once('close', finish);
  });
}

function updateRecord(step, sequence, report, response) {
  return {
    step,
    sequence,
    stage: report.stage,
    percent: response.percent,
    revision: response.revision,
    applied: response.applied,
    state: response.state,
  };
}

async function run(options) {
  const client = createClient(options.address);
  try {
    const start = {
      operation_id: options.operationId,
      kind: KIND,
      project: options.project,
      labels: { client: 'node' },
      unit: 'items',
      stages: STAGES,
      measures: MEASURES,
      heartbeat_timeout: { seconds: 30, nanos: 0 },
    };
    if (!options.operationId) {
      // With a server-picked id, request_id makes a retried start idempotent.
      start.request_id = `node-${process.pid}-${Date.now()}`;
    }
    const operation = await unary(client, 'StartOperation', start);
    const id = operation.id;
    emit({
      step: 'started',
      id,
      project: operation.project,
      state: operation.state,
      revision: operation.revision,
    });
    if (options.wait) {
      await waitForLine();
    }

    let sequence = 0;
    let last = null;
    for (const report of REPORTS) {
      await sleep(options.intervalMs);
      sequence += 1;
      let response;
      try {
        response = await unary(client, 'UpdateOperation', {
          operation_id: id,
          sequence,
          ...report,
          message: `${report.stage} ${report.stage_completed}/${report.stage_total}`,
          checkpoint: `${report.stage}-${report.stage_completed}`,
        });
      } catch (error) {
        // A QUEUED operation is cancelled at once, so its first report finds it ended.
        if (error.code === grpc.status.FAILED_PRECONDITION) {
          const current = await unary(client, 'GetOperation', { operation_id: id });
          if (current.state === 'CANCELLED') {
            emit({ step: 'cancelled', id, state: current.state, revision: current.revision });
            return 0;
          }
        }
        throw error;
      }
      emit(updateRecord('updated', sequence, report, response));
      if (response.cancel_requested) {
        // Acknowledge the cancel request: this ends the operation CANCELLED.
        const cancelled = await unary(client, 'FailOperation', {
          operation_id: id,
          error: { code: 'CANCELLED', message: 'cancelled on request', stage: report.stage },
          request_id: `${id}-cancelled`,
        });
        emit({ step: 'cancelled', id, state: cancelled.state, revision: cancelled.revision });
        return 0;
      }
      last = { sequence, report };
    }

    // A network retry of the last report: same sequence, so the server
    // acknowledges it with applied=false and does not add its counters again.
    const retried = await unary(client, 'UpdateOperation', {
      operation_id: id,
      sequence: last.sequence,
      ...last.report,
    });
    emit(updateRecord('retried', last.sequence, last.report, retried));

    const completed = await unary(client, 'CompleteOperation', {
      operation_id: id,
      message: 'done',
      result: { fields: { processed: { numberValue: 3 } } },
      request_id: `${id}-complete`,
    });
    emit({
      step: 'completed',
      id,
      state: completed.state,
      percent: completed.percent,
      revision: completed.revision,
      counters: completed.counters,
      measures: completed.measures,
    });
    return 0;
  } finally {
    client.close();
  }
}

runMain({ parse, usage: USAGE, run });
