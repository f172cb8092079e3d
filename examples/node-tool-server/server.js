'use strict';
/**
 * A minimal Trellis tool server in Node.js.
 *
 * It implements trellis.tools.v1.ToolServerService (ListTools, CallTool) straight from
 * the .proto files in ../../protos - no generated code - so any gateway configured with
 *
 *   grpc_tool_servers:
 *     - name: node
 *       target: 127.0.0.1:50070
 *       prefix: "node."
 *
 * serves its tools (word_count, reverse) beside its own. A tool's own failure (text too
 * long) is an answer, CallToolResponse.error, not a gRPC error; a request that breaks
 * the tool's contract is INVALID_ARGUMENT; an unknown tool is NOT_FOUND.
 *
 * CallTools (optional in the contract) takes several calls at once, for a gateway that
 * batches them (`batch:` on the server's entry): one result per call, in order, and a
 * call that fails fails alone, as an error result.
 *
 * Env: PORT (default 50070; 0 picks a free port), LOG_CALLS=1 prints "call <tool>" per
 * CallTool and "calls <tool> x<n>" per CallTools.
 * Prints "listening <port>" once it accepts calls; exits on SIGTERM/SIGINT.
 */

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '../../protos');
const MAX_TEXT_CHARS = 10000;

// keepCase: field names as in the .proto (input_schema, not inputSchema).
// oneofs: Value messages carry `kind`, naming the member that is set.
// google/protobuf/*.proto (struct, duration, timestamp) resolve from the copies that
// protobufjs bundles, so only our own proto root is needed.
const definition = protoLoader.loadSync('trellis/tools/v1/tools.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: false,
  oneofs: true,
});
const { ToolServerService } = grpc.loadPackageDefinition(definition).trellis.tools.v1;

// --- google.protobuf.Struct / Value <-> plain JS values -------------------------------
// proto-loader represents Struct as {fields: {k: Value}} and Value as
// {kind: 'stringValue', stringValue: 'x'}; tools want plain JSON-like values.

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
  for (const [key, value] of Object.entries(object)) fields[key] = toValue(value);
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
      return (value.listValue.values || []).map(fromValue);
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

// --- the tools ----------------------------------------------------------------------

const TEXT_INPUT = {
  type: 'object',
  properties: { text: { type: 'string', description: 'The text to work on.' } },
  required: ['text'],
  additionalProperties: false,
};

/** A failure of the tool itself: becomes CallToolResponse.error. */
class ToolFailure extends Error {
  constructor(code, message, { retryable = false, details = {} } = {}) {
    super(message);
    this.code = code;
    this.retryable = retryable;
    this.details = details;
  }
}

function checkLength(text) {
  if (text.length > MAX_TEXT_CHARS) {
    throw new ToolFailure('TEXT_TOO_LONG', `text has ${text.length} chars, at most ${MAX_TEXT_CHARS}`, {
      details: { max_chars: String(MAX_TEXT_CHARS) },
    });
  }
}

const TOOLS = {
  word_count: {
    description: 'Count the words and characters of a text.',
    input_schema: TEXT_INPUT,
    output_schema: {
      type: 'object',
      properties: { words: { type: 'integer' }, chars: { type: 'integer' } },
      required: ['words', 'chars'],
    },
    cache_ttl_seconds: 3600,
    run({ text }) {
      checkLength(text);
      const words = text.split(/\s+/).filter((word) => word.length > 0).length;
      return { words, chars: Array.from(text).length };
    },
  },
  reverse: {
    description: 'Reverse a text (by Unicode code point).',
    input_schema: TEXT_INPUT,
    output_schema: {
      type: 'object',
      properties: { text: { type: 'string' } },
      required: ['text'],
    },
    cache_ttl_seconds: 3600,
    run({ text }) {
      checkLength(text);
      return { text: Array.from(text).reverse().join('') };
    },
  },
};

function toolSpec(name, tool) {
  return {
    name,
    description: tool.description,
    version: '1',
    input_schema: toStruct(tool.input_schema),
    output_schema: toStruct(tool.output_schema),
    side_effects: false,
    cache_ttl: { seconds: tool.cache_ttl_seconds, nanos: 0 },
    timeout: { seconds: 5, nanos: 0 },
  };
}

// --- the service --------------------------------------------------------------------

function listTools(call, callback) {
  callback(null, { tools: Object.entries(TOOLS).map(([name, tool]) => toolSpec(name, tool)) });
}

/** A gRPC error for the whole call (not a tool's failure). */
class CallError extends Error {
  constructor(code, details) {
    super(details);
    this.code = code;
    this.details = details;
  }
}

/** The CallToolResponse for one request; throws CallError when the request is wrong. */
function answer(request) {
  const { tool: name } = request;
  const tool = Object.prototype.hasOwnProperty.call(TOOLS, name) ? TOOLS[name] : undefined;
  if (!tool) throw new CallError(grpc.status.NOT_FOUND, `unknown tool '${name}'`);
  const args = fromStruct(request.args);
  // The gateway validates arguments against input_schema before calling; a server still
  // checks what it relies on, and a violation is the caller's fault: INVALID_ARGUMENT.
  if (typeof args.text !== 'string') {
    throw new CallError(grpc.status.INVALID_ARGUMENT, 'args.text must be a string');
  }
  try {
    return { output: toValue(tool.run(args)) };
  } catch (error) {
    if (error instanceof ToolFailure) {
      const { code, message, retryable, details } = error;
      return { error: { code, message, retryable, details } };
    }
    throw new CallError(grpc.status.INTERNAL, `${name} failed: ${error.message}`);
  }
}

function reply(callback, produce) {
  try {
    callback(null, produce());
  } catch (error) {
    if (error instanceof CallError) {
      callback({ code: error.code, details: error.details });
      return;
    }
    callback({ code: grpc.status.INTERNAL, details: error.message });
  }
}

function callTool(call, callback) {
  if (process.env.LOG_CALLS === '1') console.log(`call ${call.request.tool}`);
  reply(callback, () => answer(call.request));
}

function callTools(call, callback) {
  const calls = call.request.calls || [];
  if (process.env.LOG_CALLS === '1') {
    console.log(`calls ${calls.length ? calls[0].tool : ''} x${calls.length}`);
  }
  // A wrong call of a batch fails alone: as a result with its error, not the whole RPC.
  const one = (request) => {
    try {
      return answer(request);
    } catch (error) {
      const code = error instanceof CallError ? grpc.status[error.code] || 'INTERNAL' : 'INTERNAL';
      return { error: { code: `TOOL_SERVER_${code}`, message: error.message, retryable: false } };
    }
  };
  reply(callback, () => ({ results: calls.map(one) }));
}

function main() {
  const port = process.env.PORT === undefined ? 50070 : Number(process.env.PORT);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`PORT must be an integer in 0..65535, got '${process.env.PORT}'`);
    process.exit(2);
  }
  const server = new grpc.Server();
  server.addService(ToolServerService.service, {
    ListTools: listTools,
    CallTool: callTool,
    CallTools: callTools,
  });
  server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (error, bound) => {
    if (error) {
      console.error(`cannot listen on 127.0.0.1:${port}: ${error.message}`);
      process.exit(1);
    }
    console.log(`listening ${bound}`);
  });
  const stop = () => {
    // Finish calls in flight, but never hang: force after a second.
    const force = setTimeout(() => server.forceShutdown(), 1000);
    force.unref();
    server.tryShutdown(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

module.exports = { toValue, fromValue, toStruct, fromStruct, TOOLS };

if (require.main === module) main();
