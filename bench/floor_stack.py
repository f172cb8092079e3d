"""The machine's floor for the process figures: the same DAGs over bare grpc.aio.

Two processes and nothing of Trellis: a *gateway* whose one method sleeps the
milliseconds it is asked for, and an *executor* whose ``Run`` (server streaming) takes a
DAG, starts each node the moment its dependencies are done, calls the gateway once per
node (unary, as Trellis's executor does) and streams one message per finished node, then
a last one. No store, no spans, no budget, no validation. ``bench.floor_bench`` times the
process benchmark's shapes against it, in the same run, so each figure of the stack can
be read against what two Python gRPC hops per node cost on this machine at that moment.

``python -m bench.floor_stack gateway PORT`` / ``python -m bench.floor_stack executor
PORT GATEWAY_TARGET``: serves on 127.0.0.1:PORT until SIGTERM. Messages are JSON bytes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator

import grpc
from grpc import aio

GATEWAY_METHOD = "/floor.Gateway/Invoke"
RUN_METHOD = "/floor.Executor/Run"


def identity(data: bytes) -> bytes:
    """Messages are bytes as they are (JSON)."""
    return data


async def _invoke(request: bytes, context: aio.ServicerContext) -> bytes:
    """The tool: sleep ``ms`` (0 answers at once, like Trellis's echo)."""
    ms = json.loads(request)["ms"]
    if ms:
        await asyncio.sleep(ms / 1000)
    return request


def _run_handler(gateway: aio.Channel):
    invoke = gateway.unary_unary(
        GATEWAY_METHOD, request_serializer=identity, response_deserializer=identity
    )

    async def run(request: bytes, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        """Nodes ``[{"id", "ms", "deps"}]``: each starts when its deps are done."""
        nodes = json.loads(request)
        done: dict[str, asyncio.Future[None]] = {
            node["id"]: asyncio.get_running_loop().create_future() for node in nodes
        }
        finished: asyncio.Queue[bytes | BaseException] = asyncio.Queue()

        async def node_task(node: dict) -> None:
            try:
                for dep in node["deps"]:
                    await done[dep]
                answer = await invoke(
                    json.dumps({"ms": node["ms"]}).encode(), timeout=30, wait_for_ready=True
                )
            except Exception as error:  # the Run fails with it rather than waiting forever
                await finished.put(error)
                return
            done[node["id"]].set_result(None)
            await finished.put(json.dumps({"node": node["id"], "answer": len(answer)}).encode())

        tasks = [asyncio.create_task(node_task(node)) for node in nodes]
        try:
            for _ in nodes:
                message = await finished.get()
                if isinstance(message, BaseException):
                    raise message
                yield message
            yield b'{"finished": true}'
        finally:
            for task in tasks:
                task.cancel()

    return run


async def serve(role: str, port: int, gateway_target: str | None) -> None:
    server = aio.server()
    channel = None
    if role == "gateway":
        handlers = {"Invoke": grpc.unary_unary_rpc_method_handler(_invoke, identity, identity)}
        service = "floor.Gateway"
    else:
        assert gateway_target is not None
        channel = aio.insecure_channel(gateway_target)
        run = _run_handler(channel)
        handlers = {"Run": grpc.unary_stream_rpc_method_handler(run, identity, identity)}
        service = "floor.Executor"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)
    if channel is not None:
        await channel.close()


if __name__ == "__main__":
    role, port = sys.argv[1], int(sys.argv[2])
    asyncio.run(serve(role, port, sys.argv[3] if len(sys.argv) > 3 else None))
