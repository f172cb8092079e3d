'use strict';
/**
 * A small Node.js client of trellis.executor.v1.ExecutorService, loaded straight from the
 * .proto files in ../../protos with @grpc/proto-loader - no generated code.
 *
 * Loader options (the same everywhere in this package):
 *   keepCase: true   field names as in the .proto (run_id, trace_id, node_finished);
 *                    the bundled google.protobuf types keep protobufjs' camelCase
 *                    (Value.stringValue, Struct.fields).
 *   longs: String    int64 fields (tokens, nano-USD, Timestamp.seconds) as decimal strings.
 *   enums: String    enum values by name (RUN_STATUS_SUCCEEDED).
 *   defaults: true   unset scalars read as their zero value (cache_hits: 0).
 *   oneofs: true     a message with a oneof names the member that is set:
 *                    RunResponse.event === 'node_started', Value.kind === 'stringValue'.
 * google/protobuf/*.proto (struct, duration, timestamp) come bundled with protobufjs, so
 * only the repository's protos/ directory is on the include path.
 *
 * Errors: the executor sends gRPC status codes with a google.rpc.Status in the
 * `grpc-status-details-bin` trailer (ErrorInfo with a stable `reason`, BadRequest field
 * violations, RetryInfo). Those types are read from googleapis' own google/rpc/status.proto
 * and error_details.proto, vendored in ../../third_party/protos (see its README.md), and
 * decoded with protobufjs.
 */

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

/** The repository's protos/ directory (override with TRELLIS_PROTOS_DIR). */
const PROTO_ROOT = process.env.TRELLIS_PROTOS_DIR || path.resolve(__dirname, '../../protos');
const EXECUTOR_PROTO = 'trellis/executor/v1/executor.proto';
/**
 * The repository's third_party/protos/ directory: google/rpc/*.proto and
 * grpc/health/v1/health.proto (override with TRELLIS_THIRD_PARTY_PROTOS_DIR).
 */
const THIRD_PARTY_PROTO_ROOT =
  process.env.TRELLIS_THIRD_PARTY_PROTOS_DIR || path.resolve(__dirname, '../../third_party/protos');
const RPC_PROTOS = ['google/rpc/status.proto', 'google/rpc/error_details.proto'];

const LOAD_OPTIONS = Object.freeze({
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});

/**
 * Load ExecutorService from `protoRoot`. Returns the grpc-js client constructor and a
 * protobufjs reflection of the same files (used for the proto3 JSON form of messages).
 */
function loadExecutor(protoRoot = PROTO_ROOT) {
  const definition = protoLoader.loadSync(EXECUTOR_PROTO, {
    ...LOAD_OPTIONS,
    includeDirs: [protoRoot],
  });
  const { ExecutorService } = grpc.loadPackageDefinition(definition).trellis.executor.v1;
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => path.join(protoRoot, target);
  root.loadSync(EXECUTOR_PROTO, { keepCase: true });
  return { ExecutorService, types: root };
}

/** An ExecutorService client; plaintext unless `credentials` says otherwise. */
function createExecutorClient(target, { protoRoot, credentials } = {}) {
  const { ExecutorService } = loadExecutor(protoRoot);
  return new ExecutorService(target, credentials || grpc.credentials.createInsecure());
}

/**
 * Start ExecutorService.Run. Every call carries a deadline (`timeoutMs` from now) and,
 * when given, the API key as `authorization: Bearer <key>` metadata (the executor then acts
 * for the key's tenant) and the tenant as `x-tenant-id` (honoured only where auth is off, as
 * in the embedded demo). The returned stream is an object-mode
 * Readable of RunResponse objects: `for await (const event of run(...))`; a gRPC error
 * rejects the loop with a grpc-js ServiceError (see describeRpcError).
 */
function callMetadata({ apiKey, tenant } = {}) {
  const metadata = new grpc.Metadata();
  if (apiKey) metadata.set('authorization', `Bearer ${apiKey}`);
  if (tenant) metadata.set('x-tenant-id', tenant);
  return metadata;
}

function run(client, request, { apiKey, tenant, timeoutMs = 300000 } = {}) {
  const metadata = callMetadata({ apiKey, tenant });
  return client.Run(request, metadata, { deadline: Date.now() + timeoutMs });
}

/** GetRun as a promise of the stored Run, with the same deadline and tenant handling. */
function getRun(client, runId, { apiKey, tenant, timeoutMs = 30000 } = {}) {
  const metadata = callMetadata({ apiKey, tenant });
  return new Promise((resolve, reject) => {
    client.GetRun({ run_id: runId }, metadata, { deadline: Date.now() + timeoutMs }, (err, res) =>
      err ? reject(err) : resolve(res.run),
    );
  });
}

// --- google.protobuf.Struct / Value <-> plain JS values --------------------------------

function toValue(value) {
  if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
  if (typeof value === 'number') return { numberValue: value };
  if (typeof value === 'string') return { stringValue: value };
  if (typeof value === 'boolean') return { boolValue: value };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  if (typeof value === 'object') return { structValue: toStruct(value) };
  throw new TypeError(`not a JSON value: ${typeof value}`);
}

function toStruct(object) {
  const fields = {};
  for (const [key, value] of Object.entries(object || {})) fields[key] = toValue(value);
  return { fields };
}

function fromValue(value) {
  if (!value) return null;
  switch (value.kind) {
    case 'numberValue':
      return value.numberValue;
    case 'stringValue':
      return value.stringValue;
    case 'boolValue':
      return value.boolValue;
    case 'structValue':
      return fromStruct(value.structValue);
    case 'listValue':
      return ((value.listValue && value.listValue.values) || []).map(fromValue);
    default:
      return null;
  }
}

function fromStruct(struct) {
  const object = {};
  for (const [key, value] of Object.entries((struct && struct.fields) || {})) {
    object[key] = fromValue(value);
  }
  return object;
}

/**
 * A RunRequest for `goal`, or for an explicit plan: `plan` is a list of ToolCall objects
 * as `trellis run --plan-file` reads them ({node_id, tool, args, depends_on}).
 */
function runRequest({ goal = '', plan = [], runId = '' } = {}) {
  if (!Array.isArray(plan)) throw new TypeError('a plan is a JSON list of ToolCall objects');
  return {
    goal,
    run_id: runId,
    plan: plan.map((node) => ({
      node_id: node.node_id,
      tool: node.tool,
      args: toStruct(node.args),
      depends_on: node.depends_on || [],
    })),
  };
}

// --- seconds/nanos and the proto3 JSON mapping -------------------------------------------

/** Milliseconds of a Timestamp or Duration object ({seconds: '12', nanos: 5}). */
function millis(secondsNanos) {
  if (!secondsNanos) return null;
  return Number(secondsNanos.seconds) * 1000 + (secondsNanos.nanos || 0) / 1e6;
}

/** 0, 3, 6 or 9 fractional digits, as the proto3 JSON mapping prints them. */
function fraction(nanos) {
  if (!nanos) return '';
  const digits = String(nanos).padStart(9, '0');
  if (digits.endsWith('000000')) return `.${digits.slice(0, 3)}`;
  if (digits.endsWith('000')) return `.${digits.slice(0, 6)}`;
  return `.${digits}`;
}

const WELL_KNOWN = {
  'google.protobuf.Timestamp': (ts) => {
    const seconds = Number(ts.seconds);
    const iso = new Date(seconds * 1000).toISOString().replace('.000Z', '');
    return `${iso}${fraction(ts.nanos)}Z`;
  },
  'google.protobuf.Duration': (d) => {
    const seconds = BigInt(d.seconds || 0);
    const nanos = d.nanos || 0;
    const negative = seconds < 0n || nanos < 0;
    const abs = seconds < 0n ? -seconds : seconds;
    return `${negative ? '-' : ''}${abs}${fraction(Math.abs(nanos))}s`;
  },
  'google.protobuf.Struct': fromStruct,
  'google.protobuf.Value': fromValue,
  'google.protobuf.ListValue': (list) => ((list && list.values) || []).map(fromValue),
};

function scalarToJson(value) {
  if (Buffer.isBuffer(value)) return value.toString('base64');
  if (typeof value === 'number' && !Number.isFinite(value)) return String(value);
  return value;
}

/**
 * A message object (as proto-loader decodes it with LOAD_OPTIONS) in the proto3 JSON
 * mapping, keeping the .proto field names: Timestamps as RFC 3339 strings, Durations as
 * "1.5s", Struct/Value as plain JSON, int64 as strings, enums by name; unset message
 * fields are left out. Python's json_format.Parse (and every other proto3 JSON parser)
 * reads it back.
 */
function toProto3Json(message, type) {
  if (WELL_KNOWN[type.fullName.slice(1)]) return WELL_KNOWN[type.fullName.slice(1)](message);
  const out = {};
  for (const field of type.fieldsArray) {
    const value = message[field.name];
    if (value === null || value === undefined) continue;
    const convert =
      field.resolvedType instanceof protobuf.Type
        ? (v) => toProto3Json(v, field.resolvedType)
        : scalarToJson;
    if (field.map) {
      out[field.name] = Object.fromEntries(Object.entries(value).map(([k, v]) => [k, convert(v)]));
    } else if (field.repeated) {
      out[field.name] = value.map(convert);
    } else {
      out[field.name] = convert(value);
    }
  }
  return out;
}

// --- gRPC errors and their google.rpc details --------------------------------------------

/**
 * google.rpc.Status and the error details, loaded from `protoRoot` (their imports,
 * google/protobuf/{any,duration}.proto, come bundled with protobufjs).
 */
function loadRpcTypes(protoRoot = THIRD_PARTY_PROTO_ROOT) {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => path.join(protoRoot, target);
  root.loadSync(RPC_PROTOS, { keepCase: true });
  return root;
}

const RPC_TYPES = loadRpcTypes();
const STATUS = RPC_TYPES.lookupType('google.rpc.Status');
const DETAIL_TYPES = {
  'google.rpc.ErrorInfo': RPC_TYPES.lookupType('google.rpc.ErrorInfo'),
  'google.rpc.BadRequest': RPC_TYPES.lookupType('google.rpc.BadRequest'),
  'google.rpc.RetryInfo': RPC_TYPES.lookupType('google.rpc.RetryInfo'),
};
const TO_OBJECT = { longs: String, enums: String, defaults: true };

/** The name of a numeric gRPC status code (3 -> 'INVALID_ARGUMENT'). */
function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || `CODE_${code}`;
}

/**
 * What a failed call said: {code, message, details_decoded, reason, domain, metadata,
 * field_violations, retry_delay_ms}. `details_decoded` is false when the error carried no
 * (or an unreadable) `grpc-status-details-bin` trailer; then only code and message are known.
 */
function describeRpcError(error) {
  const described = {
    code: statusName(error.code),
    message: error.details || error.message,
    details_decoded: false,
  };
  const raw = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!raw.length) return described;
  let status;
  try {
    status = STATUS.toObject(STATUS.decode(raw[0]), TO_OBJECT);
  } catch (decodeError) {
    described.details_error = String(decodeError.message || decodeError);
    return described;
  }
  described.details_decoded = true;
  for (const any of status.details || []) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = DETAIL_TYPES[typeName];
    if (!type) continue;
    const detail = type.toObject(type.decode(any.value), TO_OBJECT);
    if (typeName === 'google.rpc.ErrorInfo') {
      Object.assign(described, {
        reason: detail.reason,
        domain: detail.domain,
        metadata: detail.metadata,
      });
    } else if (typeName === 'google.rpc.BadRequest') {
      // {field, description}: what Trellis fills in (googleapis' newer reason and
      // localized_message stay out, so the output keeps its shape).
      described.field_violations = detail.field_violations.map(({ field, description }) => ({
        field,
        description,
      }));
    } else if (typeName === 'google.rpc.RetryInfo') {
      described.retry_delay_ms = millis(detail.retry_delay);
    }
  }
  return described;
}

module.exports = {
  PROTO_ROOT,
  THIRD_PARTY_PROTO_ROOT,
  LOAD_OPTIONS,
  loadExecutor,
  loadRpcTypes,
  createExecutorClient,
  run,
  getRun,
  runRequest,
  toStruct,
  toValue,
  fromStruct,
  fromValue,
  millis,
  toProto3Json,
  describeRpcError,
  statusName,
};
