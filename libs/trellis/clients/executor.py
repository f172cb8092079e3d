"""Client of ``trellis.executor.v1.ExecutorService`` (used by the CLI and by tests).

``api_key`` is sent on every call as ``authorization: Bearer <key>``: an executor with
auth on (the default outside the embedded demo) refuses calls without a valid key and
runs them as the key's tenant.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from trellis.clients._streams import stream
from trellis.common.v1 import common_pb2
from trellis.executor.v1 import executor_pb2, executor_pb2_grpc
from trellis.runtime.auth import AUTHORIZATION_METADATA_KEY, bearer
from trellis.runtime.errors import translated_rpc_errors


class ExecutorClient:
    def __init__(
        self, channel: aio.Channel, *, timeout: float = 300.0, api_key: str | None = None
    ) -> None:
        self._stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        self._timeout = timeout
        self._metadata = ((AUTHORIZATION_METADATA_KEY, bearer(api_key)),) if api_key else None

    def run(self, request: executor_pb2.RunRequest) -> AsyncIterator[executor_pb2.RunResponse]:
        return stream(self._stub.Run(request, timeout=self._timeout, metadata=self._metadata))

    def resume_run(self, run_id: str) -> AsyncIterator[executor_pb2.RunResponse]:
        return stream(
            self._stub.ResumeRun(
                executor_pb2.ResumeRunRequest(run_id=run_id),
                timeout=self._timeout,
                metadata=self._metadata,
            )
        )

    async def get_run(self, run_id: str) -> executor_pb2.Run:
        with translated_rpc_errors():
            response = await self._stub.GetRun(
                executor_pb2.GetRunRequest(run_id=run_id),
                timeout=self._timeout,
                metadata=self._metadata,
            )
        return response.run

    async def cancel_run(self, run_id: str) -> executor_pb2.CancelRunResponse:
        with translated_rpc_errors():
            return await self._stub.CancelRun(
                executor_pb2.CancelRunRequest(run_id=run_id),
                timeout=self._timeout,
                metadata=self._metadata,
            )

    async def list_runs(
        self, request: executor_pb2.ListRunsRequest
    ) -> executor_pb2.ListRunsResponse:
        """One page of the caller's runs, newest first."""
        with translated_rpc_errors():
            return await self._stub.ListRuns(
                request, timeout=self._timeout, metadata=self._metadata
            )

    async def list_tools(self) -> list[common_pb2.ToolSpec]:
        """The tool catalog the caller's tenant sees."""
        with translated_rpc_errors():
            response = await self._stub.ListTools(
                executor_pb2.ListToolsRequest(), timeout=self._timeout, metadata=self._metadata
            )
        return list(response.tools)

    async def get_session(self, session_id: str) -> executor_pb2.Session:
        """A session of the caller's tenant with its turns; NOT_FOUND otherwise."""
        with translated_rpc_errors():
            response = await self._stub.GetSession(
                executor_pb2.GetSessionRequest(session_id=session_id),
                timeout=self._timeout,
                metadata=self._metadata,
            )
        return response.session

    async def list_sessions(
        self, page_size: int = 0, page_token: str = ""
    ) -> executor_pb2.ListSessionsResponse:
        """One page of the caller's sessions, most recently active first."""
        with translated_rpc_errors():
            return await self._stub.ListSessions(
                executor_pb2.ListSessionsRequest(page_size=page_size, page_token=page_token),
                timeout=self._timeout,
                metadata=self._metadata,
            )

    async def delete_session(self, session_id: str) -> int:
        """Erase a session's content; how many turns it had."""
        with translated_rpc_errors():
            response = await self._stub.DeleteSession(
                executor_pb2.DeleteSessionRequest(session_id=session_id),
                timeout=self._timeout,
                metadata=self._metadata,
            )
        return response.turns
