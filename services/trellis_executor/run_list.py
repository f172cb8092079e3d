"""ListRuns: pages of one tenant's runs, and the page tokens between them. No gRPC.

Paging follows AIP-132/158: ``page_size`` 0 means ``DEFAULT_PAGE_SIZE``, more than
``MAX_PAGE_SIZE`` is taken as the maximum; ``next_page_token`` is empty on the last page.
A token is the last run's position (creation time, run id: keyset paging, so runs
created meanwhile neither repeat nor shift a page) with the tenant and the filters it was
issued for, signed (itsdangerous, HMAC) with the run store's key: every replica sharing
the store accepts it, and a token that was altered, comes from another tenant or comes
with other filters is refused (INVALID_ARGUMENT, ``INVALID_PAGE_TOKEN``) instead of
silently listing something else.
"""

from __future__ import annotations

from google.protobuf import timestamp_pb2
from itsdangerous import BadSignature, URLSafeSerializer

from trellis.executor.v1 import executor_pb2
from trellis.runtime.errors import FieldViolation, InvalidArgument
from trellis_executor.store import RunStore
from trellis_executor.store.base import Cursor, RunQuery

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
#: Longest page token accepted (ours are about 150 characters).
MAX_PAGE_TOKEN_CHARS = 1024
_SALT = "trellis.executor.v1.ListRuns"


def _micros(moment: timestamp_pb2.Timestamp) -> int:
    """A Timestamp in whole µs, rounded up: ``created_at >= t`` and ``< t`` keep their
    meaning for the µs the stores hold."""
    return moment.seconds * 1_000_000 + -(-moment.nanos // 1000)


def run_query(request: executor_pb2.ListRunsRequest) -> RunQuery:
    """The filters of a (checked) request."""
    after, before = request.created_after, request.created_before
    return RunQuery(
        status=request.status,
        created_after_us=_micros(after) if request.HasField("created_after") else None,
        created_before_us=_micros(before) if request.HasField("created_before") else None,
        session_id=request.session_id,
    )


def page_size(requested: int) -> int:
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _bad_token(why: str) -> InvalidArgument:
    return InvalidArgument(
        f"page_token refused: {why}; start again without a page_token",
        reason="INVALID_PAGE_TOKEN",
        violations=[FieldViolation("page_token", why)],
    )


class PageTokens:
    """Issues and reads signed page tokens with one key."""

    def __init__(self, key: bytes) -> None:
        self._serializer = URLSafeSerializer(key, salt=_SALT)

    @staticmethod
    def _scope(tenant_id: str, query: RunQuery) -> list[object]:
        return [
            tenant_id,
            query.status,
            query.created_after_us,
            query.created_before_us,
            query.session_id,
        ]

    def issue(self, tenant_id: str, query: RunQuery, cursor: Cursor) -> str:
        return str(
            self._serializer.dumps(
                [*self._scope(tenant_id, query), cursor.created_us, cursor.run_id]
            )
        )

    def read(self, token: str, tenant_id: str, query: RunQuery) -> Cursor:
        """The cursor ``token`` holds; ``INVALID_PAGE_TOKEN`` unless it is ours, unaltered,
        and was issued to this tenant for these filters."""
        if len(token) > MAX_PAGE_TOKEN_CHARS:
            raise _bad_token(f"longer than {MAX_PAGE_TOKEN_CHARS} characters")
        try:
            payload = self._serializer.loads(token)
        except BadSignature:
            raise _bad_token("not a page token of this service (altered or truncated)") from None
        if not isinstance(payload, list) or len(payload) != 7:
            raise _bad_token("not a page token of this service")
        *scope, created_us, run_id = payload
        if scope[0] != tenant_id:
            raise _bad_token("issued to another tenant")
        if scope != self._scope(tenant_id, query):
            raise _bad_token(
                "issued for other filters (status, created_after, created_before and"
                " session_id must be those of the first page)"
            )
        return Cursor(int(created_us), str(run_id))


async def list_page(
    store: RunStore,
    tokens: PageTokens,
    tenant_id: str,
    request: executor_pb2.ListRunsRequest,
) -> executor_pb2.ListRunsResponse:
    """One page of ``tenant_id``'s runs for a checked ListRuns request."""
    query = run_query(request)
    cursor = tokens.read(request.page_token, tenant_id, query) if request.page_token else None
    size = page_size(request.page_size)
    rows = await store.list_runs(tenant_id, query, cursor, size + 1)
    response = executor_pb2.ListRunsResponse(runs=[summary for summary, _ in rows[:size]])
    if len(rows) > size:
        response.next_page_token = tokens.issue(tenant_id, query, rows[size - 1][1])
    return response
