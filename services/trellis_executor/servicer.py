"""ExecutorService over gRPC: thin translation onto ``Runner``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis_executor.runner import Runner


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    async def Run(
        self, request: executor_pb2.RunRequest, context: aio.ServicerContext
    ) -> AsyncIterator[executor_pb2.RunResponse]:
        if not request.goal.strip() and not request.plan:
            raise InvalidArgument(
                "a run needs a goal or an explicit plan",
                reason="GOAL_REQUIRED",
                violations=[FieldViolation("goal", "empty, and no plan given")],
            )
        async for event in self._runner.run(request):
            yield event

    async def GetRun(
        self, request: executor_pb2.GetRunRequest, context: aio.ServicerContext
    ) -> executor_pb2.GetRunResponse:
        return executor_pb2.GetRunResponse(run=await self._runner.get(request.run_id))

    async def CancelRun(
        self, request: executor_pb2.CancelRunRequest, context: aio.ServicerContext
    ) -> executor_pb2.CancelRunResponse:
        status = await self._runner.cancel(request.run_id)
        return executor_pb2.CancelRunResponse(run_id=request.run_id, status=status)

    async def ResumeRun(
        self, request: executor_pb2.ResumeRunRequest, context: aio.ServicerContext
    ) -> AsyncIterator[executor_pb2.RunResponse]:
        if not request.run_id:
            raise InvalidArgument(
                "ResumeRun needs the run_id of the run to continue",
                reason="RUN_ID_REQUIRED",
                violations=[FieldViolation("run_id", "required")],
            )
        async for event in self._runner.resume(request.run_id):
            yield event
