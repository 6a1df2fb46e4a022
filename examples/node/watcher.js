#!/usr/bin/env node
'use strict';
// A Headway watcher: follows one operation with WatchOperation and prints one
// JSON line per event. Exits 0 when the server ends the stream with OK after
// the operation's terminal state (or its deletion), 1 otherwise.
//
//   node watcher.js ADDRESS OPERATION_ID [--from-revision N [--from-epoch E]]
//   node watcher.js ADDRESS --health [SERVICE]   (grpc.health.v1.Health/Check)

const { parseArgs } = require('node:util');
const {
  TERMINAL_STATES,
  grpc,
  createClient,
  createHealthClient,
  unary,
  describeError,
  emit,
  runMain,
} = require('./headway');

const USAGE =
  'usage: node watcher.js ADDRESS OPERATION_ID [--from-revision N [--from-epoch E]]\n' +
  '       node watcher.js ADDRESS --health [SERVICE]\n' +
  '  --from-revision N  resume after revision N instead of starting with a SNAPSHOT\n' +
  '  --from-epoch E     the store epoch N belongs to (a server in another epoch\n' +
  '                     answers RESET and a SNAPSHOT instead of trusting N)\n' +
  '  --health           call grpc.health.v1.Health/Check for SERVICE (default "": the\n' +
  '                     whole server); exits 0 when SERVING\n';

const RESUME_KEY = 'headway-resume-revision';

function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      health: { type: 'boolean', default: false },
      'from-revision': { type: 'string', default: '0' },
      'from-epoch': { type: 'string', default: '' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  const fromRevision = Number(values['from-revision']);
  if (values.help || !Number.isSafeInteger(fromRevision) || fromRevision < 0) {
    return null;
  }
  if (values.health) {
    if (positionals.length < 1 || positionals.length > 2) {
      return null;
    }
    return { mode: 'health', address: positionals[0], service: positionals[1] || '' };
  }
  if (positionals.length !== 2) {
    return null;
  }
  return {
    mode: 'watch',
    address: positionals[0],
    operationId: positionals[1],
    fromRevision,
    fromEpoch: values['from-epoch'],
  };
}

async function health(options) {
  const client = createHealthClient(options.address);
  try {
    const response = await unary(client, 'Check', { service: options.service });
    emit({ health: response.status, service: options.service });
    return response.status === 'SERVING' ? 0 : 1;
  } finally {
    client.close();
  }
}

function watch(options) {
  const client = createClient(options.address);
  return new Promise((resolve) => {
    let finished = false;
    let ended = false; // saw the terminal state or DELETED
    // The store epoch the revisions on this stream count in: the first event,
    // BOOKMARKs and RESET carry it. A resume sends it back with the revision.
    let epoch = options.fromEpoch;
    const finish = (code) => {
      if (!finished) {
        finished = true;
        client.close();
        resolve(code);
      }
    };
    const call = client.WatchOperation({
      operation_id: options.operationId,
      from_revision: options.fromRevision,
      from_epoch: options.fromEpoch,
    });
    call.on('data', (event) => {
      const operation = event.operation; // null on BOOKMARK / SYNCED / RESET
      const record = {
        type: event.type,
        revision: event.revision,
        state: operation ? operation.state : null,
        percent: operation ? operation.percent : null,
      };
      if (event.epoch) {
        epoch = event.epoch;
        record.epoch = event.epoch;
      }
      emit(record);
      if (event.type === 'DELETED' || (operation && TERMINAL_STATES.includes(operation.state))) {
        ended = true;
      }
    });
    call.on('error', (error) => {
      // Non-OK status. On server shutdown (UNAVAILABLE) the trailers say where to
      // resume: rerun with --from-revision (and --from-epoch, the epoch those
      // revisions count in) to continue without gaps.
      const record = { error: 'watch failed', ...describeError(error) };
      const resume = error.metadata ? error.metadata.get(RESUME_KEY) : [];
      if (resume.length > 0) {
        record.resume_revision = Number(resume[0]);
        if (epoch) {
          record.resume_epoch = epoch;
        }
      }
      process.stderr.write(`${JSON.stringify(record)}\n`);
      finish(1);
    });
    call.on('status', (status) => {
      if (status.code !== grpc.status.OK) {
        return; // reported by 'error'
      }
      if (!ended) {
        const record = { error: 'stream ended before a terminal state' };
        process.stderr.write(`${JSON.stringify(record)}\n`);
      }
      finish(ended ? 0 : 1);
    });
  });
}

runMain({
  parse,
  usage: USAGE,
  run: (options) => (options.mode === 'health' ? health(options) : watch(options)),
  errorRecord: (error) => ({ error: 'call failed', ...describeError(error) }),
});
