#!/usr/bin/env node
'use strict';
/**
 * Run a goal (or an explicit plan) on a Trellis stack and print its events as they stream.
 *
 *   node clients/node/run-goal.js [--target host:port] [--api-key K] [--tenant T] [--timeout-ms N]
 *                                 [--run-id ID] [--plan-file plan.json] [--json] ["goal"]
 *
 * --target      the executor (default $TRELLIS_EXECUTOR_TARGET or localhost:50051)
 * --api-key     sent as `authorization: Bearer <key>` (default $TRELLIS_API_KEY); needed when
 *               the executor's auth is on, and then the key decides the tenant
 * --tenant      sent as x-tenant-id metadata (default $TRELLIS_TENANT; none: the stack's
 *               `default` tenant)
 * --timeout-ms  the call's deadline (default 300000); the stack passes what is left of it on
 * --run-id      client-chosen run id (idempotent); default: the executor picks one
 * --plan-file   a JSON list of ToolCall objects ({node_id, tool, args, depends_on}): the
 *               planner is skipped, as with `trellis run --plan-file`
 * --json        one RunResponse per line on stdout in the proto3 JSON mapping with the
 *               .proto field names; an RPC error is one {"error": {...}} line on stderr
 *
 * Exit status (the table of `trellis run`, app/trellis_cli/exits.py, mirrored in EXIT):
 *   0 the run SUCCEEDED; 1 it FAILED, or ended without a `finished` event, or the call failed
 *   with an error the executor answered; 2 bad command line or plan file (nothing was sent);
 *   3 the run was PARTIAL (answered although nodes failed); 4 it was CANCELLED; 5 the executor
 *   could not be reached; 6 the call was refused (UNAUTHENTICATED, PERMISSION_DENIED).
 *   A call error goes to stderr with its code name, message and google.rpc.ErrorInfo reason.
 *   stdout closed by its reader (`| head -1`): the call is cancelled, as when any caller goes
 *   away, and the client exits quietly with 141 (a process ended by SIGPIPE).
 */

const fs = require('node:fs');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const trellis = require('./trellis-client');

/** Exit statuses: app/trellis_cli/exits.py ExitCode, mirrored. */
const EXIT = Object.freeze({
  SUCCEEDED: 0,
  FAILED: 1,
  USAGE: 2,
  PARTIAL: 3,
  CANCELLED: 4,
  UNREACHABLE: 5,
  REFUSED: 6,
});
/** The exit status of a process whose stdout reader went away (128 + SIGPIPE). */
const EXIT_STDOUT_CLOSED = 141;

const BY_STATUS = {
  RUN_STATUS_SUCCEEDED: EXIT.SUCCEEDED,
  RUN_STATUS_PARTIAL: EXIT.PARTIAL,
  RUN_STATUS_CANCELLED: EXIT.CANCELLED,
};

/** The exit status of a run that ended with `finished` (null: no `finished` event). */
function exitForRun(finished) {
  if (finished === null) return EXIT.FAILED;
  return BY_STATUS[finished.status] ?? EXIT.FAILED;
}

/**
 * UNAVAILABLE made by the client's own channel (no Trellis server sent it: no
 * google.rpc.Status trailer), i.e. the target could not be reached.
 */
function isUnreachable(error) {
  const trailer = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  return error.code === grpc.status.UNAVAILABLE && trailer.length === 0;
}

/** The exit status of a call that failed with a grpc-js ServiceError. */
function exitForError(error) {
  if (error.code === grpc.status.UNAUTHENTICATED || error.code === grpc.status.PERMISSION_DENIED) {
    return EXIT.REFUSED;
  }
  return isUnreachable(error) ? EXIT.UNREACHABLE : EXIT.FAILED;
}

const PLAN_SHAPE = '[{"node_id": "n1", "tool": "arithmetic", "args": {...}, "depends_on": [...]}, ...]';
const NODE_FIELDS = new Set(['node_id', 'tool', 'args', 'depends_on']);

/** A bad --plan-file: one line naming the file (exit 2, nothing sent). */
class PlanFileError extends Error {}

function jsonType(value) {
  if (value === null) return 'null';
  return Array.isArray(value) ? 'list' : typeof value === 'object' ? 'object' : typeof value;
}

/** The plan in `file`: a JSON list of ToolCall objects, checked node by node. */
function readPlan(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (error) {
    const why = error.code === 'ENOENT' ? 'no such file' : error.message;
    throw new PlanFileError(`${file}: cannot read it (${why})`);
  }
  let plan;
  try {
    plan = JSON.parse(text);
  } catch (error) {
    throw new PlanFileError(`${file}: not JSON (${error.message}); expected ${PLAN_SHAPE}`);
  }
  if (!Array.isArray(plan)) {
    throw new PlanFileError(
      `${file}: expected a JSON list of ToolCall objects ${PLAN_SHAPE}, not a JSON ${jsonType(plan)}`,
    );
  }
  const problems = [];
  plan.forEach((node, i) => {
    const at = `plan[${i}]`;
    if (jsonType(node) !== 'object') {
      problems.push(`${at}: must be an object {node_id, tool, args, depends_on}`);
      return;
    }
    for (const field of ['node_id', 'tool']) {
      if (typeof node[field] !== 'string') problems.push(`${at}.${field}: must be a string`);
    }
    if (node.args != null && jsonType(node.args) !== 'object') {
      problems.push(`${at}.args: must be an object`);
    }
    const deps = node.depends_on;
    if (deps != null && !(Array.isArray(deps) && deps.every((d) => typeof d === 'string'))) {
      problems.push(`${at}.depends_on: must be a list of node ids`);
    }
    for (const key of Object.keys(node)) {
      if (!NODE_FIELDS.has(key)) problems.push(`${at}.${key}: not a ToolCall field`);
    }
  });
  if (problems.length) throw new PlanFileError(`${file}: ${problems.join('; ')}`);
  return plan;
}

const USAGE =
  'usage: run-goal.js [--target host:port] [--api-key K] [--tenant T] [--timeout-ms N] [--run-id ID] ' +
  '[--plan-file plan.json] [--json] ["goal"]';

function parseCommandLine(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      target: { type: 'string', default: process.env.TRELLIS_EXECUTOR_TARGET || 'localhost:50051' },
      'api-key': { type: 'string', default: process.env.TRELLIS_API_KEY || '' },
      tenant: { type: 'string', default: process.env.TRELLIS_TENANT || '' },
      'timeout-ms': { type: 'string', default: '300000' },
      'run-id': { type: 'string', default: '' },
      'plan-file': { type: 'string' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) return { help: true };
  const timeoutMs = Number(values['timeout-ms']);
  if (!Number.isInteger(timeoutMs) || timeoutMs <= 0) {
    throw new Error(`--timeout-ms must be a positive integer, not ${values['timeout-ms']}`);
  }
  if (positionals.length > 1) throw new Error('give one goal (quote it)');
  // An explicit "" is sent as is: the executor, not this client, decides what is valid.
  if (positionals.length === 0 && !values['plan-file']) throw new Error('give a goal or --plan-file');
  const plan = values['plan-file'] ? readPlan(values['plan-file']) : [];
  return {
    target: values.target,
    apiKey: values['api-key'],
    tenant: values.tenant,
    timeoutMs,
    json: values.json,
    request: trellis.runRequest({ goal: positionals[0] || '', plan, runId: values['run-id'] }),
  };
}

/** Human-readable lines for each event; answer deltas are written as they come. */
class HumanPrinter {
  constructor(out) {
    this.out = out;
    this.inAnswer = false;
  }

  line(text) {
    if (this.inAnswer) this.out.write('\n');
    this.inAnswer = false;
    this.out.write(`${text}\n`);
  }

  print(event) {
    const body = event[event.event];
    switch (event.event) {
      case 'started':
        this.line(`run ${event.run_id} started, trace_id ${body.trace_id}`);
        break;
      case 'node_planned': {
        const call = body.call;
        const deps = call.depends_on.length ? ` after ${call.depends_on.join(', ')}` : '';
        this.line(
          `planned  ${call.node_id} ${call.tool} ${JSON.stringify(trellis.fromStruct(call.args))}${deps}`,
        );
        break;
      }
      case 'node_started':
        this.line(`started  ${body.node_id} (attempt ${body.attempt})`);
        break;
      case 'node_finished': {
        const o = body.outcome;
        const took = trellis.millis(o.finished_at) - trellis.millis(o.started_at);
        const parts = [`finished ${o.node_id} ${o.status.replace('NODE_STATUS_', '')}`];
        if (Number.isFinite(took)) parts.push(`${Math.round(took)} ms`);
        if (o.cache_hit) parts.push('cache hit');
        if (o.error) parts.push(`error ${o.error.code}: ${o.error.message}`);
        else parts.push(summarize(trellis.fromValue(o.output)));
        this.line(parts.join('  '));
        break;
      }
      case 'answer_delta':
        if (!this.inAnswer) this.out.write('answer: ');
        this.inAnswer = true;
        this.out.write(body.text);
        break;
      case 'finished':
        this.finished(body);
        break;
      default:
        this.line(`(event ${event.event || 'unknown'})`);
    }
  }

  finished(f) {
    const failed = f.failed_nodes ? ` (${f.failed_nodes} node${f.failed_nodes === 1 ? '' : 's'} failed)` : '';
    this.line(`status: ${f.status.replace('RUN_STATUS_', '')}${failed}`);
    if (f.error) this.line(`error: ${f.error.code}: ${f.error.message}`);
    const usage = f.usage || {};
    this.line(`tokens: ${usage.input_tokens || 0} in / ${usage.output_tokens || 0} out (${usage.model || '-'})`);
    const usd = (Number(f.cost_nano_usd) / 1e9).toFixed(6);
    this.line(`cost: $${usd} (${f.cost_nano_usd} nano-USD)`);
    this.line(`cache hits: ${f.cache_hits}`);
    if (f.duration) this.line(`duration: ${Math.round(trellis.millis(f.duration))} ms`);
  }
}

function summarize(value) {
  const text = typeof value === 'string' ? value : JSON.stringify(value);
  const flat = String(text).replace(/\s+/g, ' ').trim();
  return flat.length > 80 ? `${flat.slice(0, 79)}…` : flat;
}

function reportError(error, json, target) {
  const described = trellis.describeRpcError(error);
  if (isUnreachable(error)) {
    // grpc-js's own diagnostics (addresses, socket errors) say nothing to the person.
    described.message =
      `cannot reach the executor at ${target}; is the stack running? Start it with ` +
      '`trellis up` (or `make up`), or set --target/TRELLIS_EXECUTOR_TARGET';
  }
  if (json) {
    process.stderr.write(`${JSON.stringify({ error: described })}\n`);
    return;
  }
  const lines = [`error: ${described.code}: ${described.message}`];
  if (!described.details_decoded && !isUnreachable(error)) {
    lines.push('(no google.rpc.Status details in the trailers: code and message only)');
  }
  if (described.reason) {
    lines.push(`reason: ${described.reason}${described.domain ? ` (${described.domain})` : ''}`);
  }
  for (const [key, value] of Object.entries(described.metadata || {})) {
    lines.push(`  ${key}: ${value}`);
  }
  for (const v of described.field_violations || []) lines.push(`  ${v.field}: ${v.description}`);
  if (described.retry_delay_ms != null) lines.push(`retry after: ${described.retry_delay_ms} ms`);
  if (error.code === grpc.status.UNAUTHENTICATED) {
    lines.push('give an API key with --api-key or TRELLIS_API_KEY (`trellis up` prints one)');
  }
  process.stderr.write(`${lines.join('\n')}\n`);
}

async function main(argv) {
  let options;
  try {
    options = parseCommandLine(argv);
  } catch (error) {
    const usage = error instanceof PlanFileError ? '' : `\n${USAGE}`;
    process.stderr.write(`${error.message}${usage}\n`);
    return EXIT.USAGE;
  }
  if (options.help) {
    process.stdout.write(`${USAGE}\n`);
    return EXIT.SUCCEEDED;
  }
  const { ExecutorService, types } = trellis.loadExecutor();
  const responseType = types.lookupType('trellis.executor.v1.RunResponse');
  const client = new ExecutorService(options.target, grpc.credentials.createInsecure());
  const printer = new HumanPrinter(process.stdout);
  let finished = null;
  let call = null;
  let stdoutClosed = false;
  // The reader of stdout went away (`| head -1`): stop quietly, as a caller that leaves.
  const onStdoutError = (error) => {
    if (error.code !== 'EPIPE') throw error;
    stdoutClosed = true;
    if (call) call.cancel();
  };
  process.stdout.on('error', onStdoutError);
  try {
    call = trellis.run(client, options.request, {
      apiKey: options.apiKey,
      tenant: options.tenant,
      timeoutMs: options.timeoutMs,
    });
    for await (const event of call) {
      if (stdoutClosed) break;
      if (options.json) {
        process.stdout.write(`${JSON.stringify(trellis.toProto3Json(event, responseType))}\n`);
      } else {
        printer.print(event);
      }
      if (event.event === 'finished') finished = event.finished;
    }
  } catch (error) {
    if (stdoutClosed) return EXIT_STDOUT_CLOSED;
    if (error.code === undefined) throw error;
    reportError(error, options.json, options.target);
    // An error after `finished` (a streamed plan found invalid): the run's status decides.
    return finished === null ? exitForError(error) : exitForRun(finished);
  } finally {
    client.close();
  }
  if (stdoutClosed) return EXIT_STDOUT_CLOSED;
  if (finished === null) {
    process.stderr.write('the stream ended without a finished event\n');
  }
  return exitForRun(finished);
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (error) => {
      process.stderr.write(`${error.stack || error}\n`);
      process.exitCode = 1;
    },
  );
}

module.exports = { EXIT, main, parseCommandLine, readPlan, exitForRun, exitForError };
