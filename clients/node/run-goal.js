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
 * Exit status: 0 the run SUCCEEDED; 1 it finished otherwise (FAILED, CANCELLED) or the
 * stream ended without a `finished` event; 2 bad command line; 3 the call failed with a
 * gRPC error (its code name, message and google.rpc.ErrorInfo reason go to stderr).
 */

const fs = require('node:fs');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const trellis = require('./trellis-client');

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
  const plan = values['plan-file'] ? JSON.parse(fs.readFileSync(values['plan-file'], 'utf8')) : [];
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
    this.line(`status: ${f.status.replace('RUN_STATUS_', '')}`);
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

function reportError(error, json) {
  const described = trellis.describeRpcError(error);
  if (json) {
    process.stderr.write(`${JSON.stringify({ error: described })}\n`);
    return;
  }
  const lines = [`error: ${described.code}: ${described.message}`];
  if (!described.details_decoded) {
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
  process.stderr.write(`${lines.join('\n')}\n`);
}

async function main(argv) {
  let options;
  try {
    options = parseCommandLine(argv);
  } catch (error) {
    process.stderr.write(`${error.message}\n${USAGE}\n`);
    return 2;
  }
  if (options.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const { ExecutorService, types } = trellis.loadExecutor();
  const responseType = types.lookupType('trellis.executor.v1.RunResponse');
  const client = new ExecutorService(options.target, grpc.credentials.createInsecure());
  const printer = new HumanPrinter(process.stdout);
  let finished = null;
  try {
    const call = trellis.run(client, options.request, {
      apiKey: options.apiKey,
      tenant: options.tenant,
      timeoutMs: options.timeoutMs,
    });
    for await (const event of call) {
      if (options.json) {
        process.stdout.write(`${JSON.stringify(trellis.toProto3Json(event, responseType))}\n`);
      } else {
        printer.print(event);
      }
      if (event.event === 'finished') finished = event.finished;
    }
  } catch (error) {
    if (error.code === undefined) throw error;
    reportError(error, options.json);
    return 3;
  } finally {
    client.close();
  }
  if (finished === null) {
    process.stderr.write('the stream ended without a finished event\n');
    return 1;
  }
  return finished.status === 'RUN_STATUS_SUCCEEDED' ? 0 : 1;
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

module.exports = { main, parseCommandLine };
