"""ExecutorService over gRPC: thin translation onto ``Runner``.

Every request passes the front door (``front_door``) first: a field that breaks its
rule is INVALID_ARGUMENT before the runner looks anything up, stores or runs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis.runtime.validation import DEFAULT_MAX_GOAL_BYTES
from trellis_executor.front_door import (
    check_list_runs,
    check_list_sessions,
    check_run_id,
    check_run_request,
    check_session_id,
)
from trellis_executor.runner import Runner


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, runner: Runner, *, max_goal_bytes: int = DEFAULT_MAX_GOAL_BYTES) -> None:
        self._runner = runner
        self._max_goal_bytes = max_goal_bytes

    async def Run(
        self, request: executor_pb2.RunRequest, context: aio.ServicerContext
    ) -> AsyncIterator[executor_pb2.RunResponse]:
        check_run_request(request, self._max_goal_bytes)
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
        check_run_id(request.run_id)
        return executor_pb2.GetRunResponse(run=await self._runner.get(request.run_id))

    async def CancelRun(
        self, request: executor_pb2.CancelRunRequest, context: aio.ServicerContext
    ) -> executor_pb2.CancelRunResponse:
        check_run_id(request.run_id)
        status = await self._runner.cancel(request.run_id)
        return executor_pb2.CancelRunResponse(run_id=request.run_id, status=status)

    async def ResumeRun(
        self, request: executor_pb2.ResumeRunRequest, context: aio.ServicerContext
    ) -> AsyncIterator[executor_pb2.RunResponse]:
        check_run_id(request.run_id)
        async for event in self._runner.resume(request.run_id):
            yield event

    async def ListRuns(
        self, request: executor_pb2.ListRunsRequest, context: aio.ServicerContext
    ) -> executor_pb2.ListRunsResponse:
        check_list_runs(request)
        return await self._runner.list_runs(request)

    async def ListTools(
        self, request: executor_pb2.ListToolsRequest, context: aio.ServicerContext
    ) -> executor_pb2.ListToolsResponse:
        return executor_pb2.ListToolsResponse(tools=await self._runner.tools())

    async def GetSession(
        self, request: executor_pb2.GetSessionRequest, context: aio.ServicerContext
    ) -> executor_pb2.GetSessionResponse:
        check_session_id(request.session_id)
        session = await self._runner.sessions.get(request.session_id)
        return executor_pb2.GetSessionResponse(session=session)

    async def ListSessions(
        self, request: executor_pb2.ListSessionsRequest, context: aio.ServicerContext
    ) -> executor_pb2.ListSessionsResponse:
        check_list_sessions(request)
        return await self._runner.sessions.list_page(request)

    async def DeleteSession(
        self, request: executor_pb2.DeleteSessionRequest, context: aio.ServicerContext
    ) -> executor_pb2.DeleteSessionResponse:
        check_session_id(request.session_id)
        turns = await self._runner.sessions.delete(request.session_id)
        return executor_pb2.DeleteSessionResponse(turns=turns)
