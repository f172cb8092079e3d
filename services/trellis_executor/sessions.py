"""Sessions: the turns of one conversation, their context for the planner. No gRPC.

A run with a ``session_id`` is the next turn of that session of the caller's tenant:
the store admits it (one turn at a time, at most ``session_max_turns``: ``store/
sessions.py``), and before its first Plan the run reads its context here: the summary
of folded turns and the earlier turns after it (goal, answer, compact tool results).
When that context is over ``session_context_tokens`` the planner's Summarize folds the
oldest turns into a new summary - a model call charged to this turn like its plan and
join, on its trace and in the ledger under the session - which is stored and reused by
the next turns until the context outgrows the budget again. A fold that fails does not
fail the turn: the oldest turns are left out of this turn's context instead.

Get/List/Delete see only the caller's tenant's sessions, and not expired ones
(``session_ttl`` of inactivity): another tenant's session id is NOT_FOUND.
"""

from __future__ import annotations

from collections.abc import Callable

from itsdangerous import BadSignature, URLSafeSerializer

from trellis.contract.session_context import compact_result, context_tokens, fold_count
from trellis.executor.v1 import executor_pb2
from trellis.planner.v1 import planner_pb2
from trellis.runtime import context
from trellis.runtime.errors import FieldViolation, InvalidArgument, TrellisError
from trellis.runtime.logs import get_logger
from trellis_executor import ports
from trellis_executor.run_list import MAX_PAGE_TOKEN_CHARS, page_size
from trellis_executor.store import RunStore
from trellis_executor.store.sessions import (
    SessionCursor,
    SessionRules,
    build_session,
    session_not_found,
)

log = get_logger(__name__)
_SALT = "trellis.executor.v1.ListSessions"


def _bad_token(why: str) -> InvalidArgument:
    return InvalidArgument(
        f"page_token refused: {why}; start again without a page_token",
        reason="INVALID_PAGE_TOKEN",
        violations=[FieldViolation("page_token", why)],
    )


class Sessions:
    """The session RPCs, and each turn's context."""

    def __init__(
        self,
        store: RunStore,
        planner: ports.Planner,
        *,
        context_tokens: int,
        ttl_seconds: float,
        max_turns: int,
    ) -> None:
        self._store = store
        self._planner = planner
        self._context_tokens = context_tokens
        self._ttl = ttl_seconds
        self.rules = SessionRules(ttl_seconds, max_turns)
        self._tokens = URLSafeSerializer(store.page_token_key, salt=_SALT)

    async def get(self, session_id: str) -> executor_pb2.Session:
        found = await self._store.get_session(context.tenant(), session_id, self._ttl)
        if found is None:
            raise session_not_found(session_id)
        return build_session(*found)

    async def list_page(
        self, request: executor_pb2.ListSessionsRequest
    ) -> executor_pb2.ListSessionsResponse:
        tenant = context.tenant()
        cursor = self._read(request.page_token, tenant) if request.page_token else None
        size = page_size(request.page_size)
        rows = await self._store.list_sessions(tenant, self._ttl, cursor, size + 1)
        response = executor_pb2.ListSessionsResponse(sessions=[s for s, _ in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1][1]
            response.next_page_token = str(
                self._tokens.dumps([tenant, last.updated_us, last.session_id])
            )
        return response

    def _read(self, token: str, tenant: str) -> SessionCursor:
        if len(token) > MAX_PAGE_TOKEN_CHARS:
            raise _bad_token(f"longer than {MAX_PAGE_TOKEN_CHARS} characters")
        try:
            payload = self._tokens.loads(token)
        except BadSignature:
            raise _bad_token("not a page token of this service (altered or truncated)") from None
        if not isinstance(payload, list) or len(payload) != 3:
            raise _bad_token("not a page token of this service")
        if payload[0] != tenant:
            raise _bad_token("issued to another tenant")
        return SessionCursor(int(payload[1]), str(payload[2]))

    async def delete(self, session_id: str) -> int:
        return await self._store.delete_session(context.tenant(), session_id, self._ttl)

    async def context_of(
        self,
        run_id: str,
        session_id: str,
        *,
        model: str,
        attempt: int,
        charge: Callable[[planner_pb2.ModelCallUsage], None],
    ) -> planner_pb2.SessionContext | None:
        """The context of turn ``run_id``: the earlier turns and the summary, folded
        first when over budget (``charge`` gets the fold's model call)."""
        found = await self._store.get_session(context.tenant(), session_id, self._ttl)
        if found is None:
            return None
        record, runs = found
        ids = [run.run_id for run in runs]
        earlier = runs[: ids.index(run_id)] if run_id in ids else runs
        session = planner_pb2.SessionContext(
            session_id=session_id,
            summary=record.summary,
            summary_through_turn=record.summary_through_turn if record.summary else 0,
        )
        for number, run in enumerate(earlier, start=1):
            if number <= session.summary_through_turn:
                continue
            calls = {call.node_id: call for call in run.plan}
            session.turns.append(
                planner_pb2.ContextTurn(
                    number=number,
                    goal=run.goal,
                    answer=run.answer,
                    results=[
                        compact_result(calls[o.node_id], o)
                        for o in run.outcomes
                        if o.node_id in calls
                    ],
                )
            )
        if context_tokens(session) <= self._context_tokens:
            return session
        return await self._fold(session, run_id, model, attempt, charge)

    async def _fold(
        self,
        session: planner_pb2.SessionContext,
        run_id: str,
        model: str,
        attempt: int,
        charge: Callable[[planner_pb2.ModelCallUsage], None],
    ) -> planner_pb2.SessionContext:
        request = planner_pb2.SummarizeRequest(
            run_id=run_id,
            session=session,
            max_tokens=self._context_tokens,
            model=model,
            attempt=attempt,
        )
        try:
            response = await self._planner.summarize(request)
        except TrellisError as error:
            log.warning(
                "session context not folded: its oldest turns are left out of this turn",
                session_id=session.session_id,
                reason=error.reason,
            )
            fold = fold_count(session, self._context_tokens)
            kept = planner_pb2.SessionContext()
            kept.CopyFrom(session)
            del kept.turns[:fold]
            return kept
        if response.HasField("usage"):
            charge(response.usage)
        if not response.folded:
            return session
        await self._store.save_summary(
            context.tenant(), session.session_id, response.summary, response.through_turn
        )
        folded = planner_pb2.SessionContext(
            session_id=session.session_id,
            summary=response.summary,
            summary_through_turn=response.through_turn,
            turns=[t for t in session.turns if t.number > response.through_turn],
        )
        return folded
