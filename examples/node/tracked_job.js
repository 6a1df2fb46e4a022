#!/usr/bin/env node
'use strict';
// A job that reports its progress best effort (tracker.js): it runs to the end, and exits
// with its own status, whether Headway is up, down, slow or restarted meanwhile.
// Prints one JSON line per step on stdout; the tracker's warnings go to stderr as JSON.
//
//   node tracked_job.js ADDRESS [PROJECT] [--items N] [--interval-ms N] [--finish-timeout-ms N]

const { parseArgs } = require('node:util');
const { createClient, emit, runMain } = require('./headway');
const { Tracker } = require('./tracker');

const USAGE =
  'usage: node tracked_job.js ADDRESS [PROJECT] [--items N] [--interval-ms N]' +
  ' [--finish-timeout-ms N]\n' +
  '  ADDRESS               host:port of a Headway server, e.g. 127.0.0.1:50051\n' +
  '  PROJECT               project of the operation (default "node-job")\n' +
  '  --items N             items the job processes (default 20)\n' +
  '  --interval-ms N       time each item takes (default 50)\n' +
  '  --finish-timeout-ms N how long the end may wait for the server (default 5000)\n';

function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      items: { type: 'string', default: '20' },
      'interval-ms': { type: 'string', default: '50' },
      'finish-timeout-ms': { type: 'string', default: '5000' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  const items = Number(values.items);
  const intervalMs = Number(values['interval-ms']);
  const finishTimeoutMs = Number(values['finish-timeout-ms']);
  const numbers = [items, intervalMs, finishTimeoutMs];
  const valid = numbers.every((n) => n >= 0);
  if (values.help || positionals.length < 1 || positionals.length > 2 || !valid) {
    return null;
  }
  return {
    address: positionals[0],
    project: positionals[1] || 'node-job',
    items,
    intervalMs,
    finishTimeoutMs,
  };
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function run(options) {
  const client = createClient(options.address);
  const tracker = new Tracker(
    client,
    { kind: 'node-job', project: options.project, total: options.items, unit: 'items' },
    {
      deadlineMs: 1000,
      minIntervalMs: 100,
      maxBackoffMs: 1000,
      finishTimeoutMs: options.finishTimeoutMs,
    },
  );
  try {
    emit({ step: 'started', id: tracker.id });
    for (let done = 1; done <= options.items; done += 1) {
      await sleep(options.intervalMs); // the job's own work
      tracker.update({ completed: done, message: `item ${done}`, counters: { items: 1 } });
      if (tracker.cancelRequested) {
        // Respect cancellation: stop, and acknowledge it (the operation ends CANCELLED).
        const op = await tracker.finish('FailOperation', {
          error: { code: 'CANCELLED', message: 'cancelled on request' },
        });
        emit({ step: 'cancelled', id: tracker.id, items: done, state: op ? op.state : null });
        return 0;
      }
    }
    const op = await tracker.finish('CompleteOperation', { message: 'done' });
    emit({
      step: 'done',
      id: tracker.id,
      items: options.items,
      tracked: op !== null,
      state: op ? op.state : null,
    });
    return 0; // the job's status, whatever happened to the tracker
  } finally {
    client.close();
  }
}

runMain({ parse, usage: USAGE, run });
