'use strict';
// Loads Headway's contract straight from the repository's protos/ (no copy) and
// makes clients for it and for the standard grpc.health.v1.Health service.

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// The project's proto root: protos/headway/v1/progress.proto is imported as
// "headway/v1/progress.proto", exactly as protoc sees it with `-I protos`.
const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const PROGRESS_PROTO = 'headway/v1/progress.proto';

// One set of options for every message, used consistently by both scripts:
// - keepCase: field names as in the .proto (operation_id, stage_completed), like
//   the Python stubs and the README.
// - longs: Number: int64/uint64 (revision, counters, sequence) as JS numbers;
//   exact up to 2^53, far beyond any revision or counter this demo produces.
// - enums: String: states and event types as their names ("SUCCEEDED").
// - defaults: true: unset scalars come back as 0/""/false instead of undefined.
// - oneofs: true: proto3 `optional` fields are synthetic oneofs; this lets a
//   decoded UpdateOperationRequest tell "unset" from "zero".
// The google/protobuf/*.proto imports (Duration, Empty, Struct, Timestamp) are
// the well-known types bundled with protobufjs (a dependency of proto-loader):
// they resolve without any file on disk, so includeDirs only needs PROTO_ROOT.
const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
});

// grpc.health.v1 is not among the project's protos, and the Python package
// grpcio-health-checking ships only generated health_pb2.py, not health.proto.
// Rather than depend on another npm package or on a Python install, the Check
// and Watch part of https://github.com/grpc/grpc-proto/blob/master/grpc/health/
// v1/health.proto (newer versions add List, not needed here) is declared as a
// protobufjs JSON descriptor: same package, names, field numbers and types, so
// encoding goes through the same proto-loader/protobufjs path as Headway's.
const HEALTH_DESCRIPTOR = {
  nested: {
    grpc: {
      nested: {
        health: {
          nested: {
            v1: {
              nested: {
                HealthCheckRequest: {
                  fields: { service: { type: 'string', id: 1 } },
                },
                HealthCheckResponse: {
                  fields: { status: { type: 'ServingStatus', id: 1 } },
                  nested: {
                    ServingStatus: {
                      values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 },
                    },
                  },
                },
                Health: {
                  methods: {
                    Check: {
                      requestType: 'HealthCheckRequest',
                      responseType: 'HealthCheckResponse',
                    },
                    Watch: {
                      requestType: 'HealthCheckRequest',
                      responseType: 'HealthCheckResponse',
                      responseStream: true,
                    },
                  },
                },
              },
            },
          },
        },
      },
    },
  },
};

const TERMINAL_STATES = Object.freeze(['SUCCEEDED', 'FAILED', 'CANCELLED']);

let cached = null;

/** The loaded grpc objects: { headway: headway.v1, health: grpc.health.v1 }. */
function load() {
  if (cached === null) {
    const progress = grpc.loadPackageDefinition(
      protoLoader.loadSync(PROGRESS_PROTO, LOADER_OPTIONS),
    );
    const health = grpc.loadPackageDefinition(
      protoLoader.fromJSON(HEALTH_DESCRIPTOR, LOADER_OPTIONS),
    );
    cached = { headway: progress.headway.v1, health: health.grpc.health.v1 };
  }
  return cached;
}

/**
 * Channel credentials from the environment: TLS when HEADWAY_TLS_CA names the
 * CA file that signed the server's certificate (with HEADWAY_TLS_CERT and
 * HEADWAY_TLS_KEY for a server that asks for client certificates), else
 * plaintext (what `make run` serves).
 */
function defaultCredentials() {
  const ca = process.env.HEADWAY_TLS_CA;
  if (!ca) return grpc.credentials.createInsecure();
  const read = (name) => (process.env[name] ? fs.readFileSync(process.env[name]) : null);
  return grpc.credentials.createSsl(
    fs.readFileSync(ca),
    read('HEADWAY_TLS_KEY'),
    read('HEADWAY_TLS_CERT'),
  );
}

/**
 * Client options: with HEADWAY_TOKEN set, every call carries
 * `authorization: Bearer <token>` (a server started with --auth-tokens needs it).
 * An interceptor rather than call credentials, which grpc-js sends only over TLS.
 */
function clientOptions() {
  const token = process.env.HEADWAY_TOKEN;
  if (!token) return {};
  const bearer = (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        metadata.set('authorization', `Bearer ${token}`);
        next(metadata, listener);
      },
    });
  return { interceptors: [bearer] };
}

/** A ProgressTracker client; credentials and token from the environment by default. */
function createClient(address, credentials = defaultCredentials()) {
  return new (load().headway.ProgressTracker)(address, credentials, clientOptions());
}

/** A grpc.health.v1.Health client (health needs no token). */
function createHealthClient(address, credentials = defaultCredentials()) {
  return new (load().health.Health)(address, credentials);
}

/** Calls a unary method and resolves with its response; every call gets a deadline. */
function unary(client, method, request, { timeoutMs = 5000 } = {}) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (error, response) => {
      if (error) {
        reject(error);
      } else {
        resolve(response);
      }
    });
  });
}

/** A gRPC error as one JSON-friendly object. */
function describeError(error) {
  const code = typeof error.code === 'number' ? grpc.status[error.code] : undefined;
  return { code: code || 'UNKNOWN', details: error.details || error.message };
}

/** Writes one JSON line to stdout. */
function emit(record) {
  process.stdout.write(`${JSON.stringify(record)}\n`);
}

/**
 * Runs an example from the command line: `parse` reads the arguments (null, or
 * a thrown error, prints the usage: exit 2), then the process exits with what
 * `run` returns; if `run` throws, one JSON line from `errorRecord` on stderr
 * and exit 1.
 */
function runMain({
  parse,
  usage,
  run,
  errorRecord = (error) => ({ step: 'error', ...describeError(error) }),
}) {
  async function main() {
    let options;
    try {
      options = parse(process.argv.slice(2));
    } catch (error) {
      process.stderr.write(`${error.message}\n`);
      options = null;
    }
    if (options === null) {
      process.stderr.write(usage);
      return 2;
    }
    try {
      return await run(options);
    } catch (error) {
      process.stderr.write(`${JSON.stringify(errorRecord(error))}\n`);
      return 1;
    }
  }
  main().then((code) => {
    process.exitCode = code;
  });
}

module.exports = {
  PROTO_ROOT,
  LOADER_OPTIONS,
  TERMINAL_STATES,
  grpc,
  load,
  createClient,
  createHealthClient,
  unary,
  describeError,
  emit,
  runMain,
};
