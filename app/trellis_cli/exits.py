"""How a ``trellis`` command ends: the one table of exit codes, and one line per error.

Every command that calls a service runs inside ``reported(target)``: an error a service
answered becomes one line on stderr (its ErrorInfo reason and message, then the fields at
fault) and the exit code of its kind; a service that cannot be reached is named with the
address tried and how to start the stack; a refused API key says how to give one. gRPC's
own diagnostics (resolver and socket details, addresses of the services behind the one
called) are never shown: they say nothing to the person at the terminal.

``clients/node/run-goal.js`` mirrors ``ExitCode``; README "Running it" and docs/clients.md
document it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum

import grpc
import typer
from rich.console import Console
from rich.markup import escape

from trellis.executor.v1 import executor_pb2
from trellis.runtime.errors import (
    PermissionDenied,
    TrellisError,
    Unauthenticated,
    Unavailable,
    rich_status,
)

stderr = Console(stderr=True, highlight=False)


class ExitCode(IntEnum):
    """Exit status of ``trellis run`` (and of every command that calls a service)."""

    #: The run succeeded (other commands: they did what was asked).
    SUCCEEDED = 0
    #: The run ended FAILED (or without a result), or the service answered with an error.
    FAILED = 1
    #: Bad arguments or plan file, found before anything was sent.
    USAGE = 2
    #: A goal run answered although some of its nodes failed.
    PARTIAL = 3
    #: The run was cancelled.
    CANCELLED = 4
    #: The service could not be reached (nothing listens at the target, or no route).
    UNREACHABLE = 5
    #: The service refused the caller: UNAUTHENTICATED or PERMISSION_DENIED.
    REFUSED = 6


#: Ctrl-C (SIGINT) ended the command, as a shell reports a process SIGINT ended (128 + 2).
#: ``trellis run`` has then cancelled its run and said so; ``trellis runs watch`` only
#: stopped watching.
EXIT_INTERRUPTED = 130

_BY_STATUS = {
    executor_pb2.RUN_STATUS_SUCCEEDED: ExitCode.SUCCEEDED,
    executor_pb2.RUN_STATUS_PARTIAL: ExitCode.PARTIAL,
    executor_pb2.RUN_STATUS_CANCELLED: ExitCode.CANCELLED,
}


def for_run(finished: executor_pb2.RunFinished | None) -> ExitCode:
    """The exit code of a run that ended with ``finished`` (None: the stream ended without
    one, so nobody can say it succeeded)."""
    if finished is None:
        return ExitCode.FAILED
    return _BY_STATUS.get(finished.status, ExitCode.FAILED)


def is_unreachable(error: TrellisError) -> bool:
    """UNAVAILABLE made by the client's own channel (no Trellis server sent it: its trailers
    carry no google.rpc.Status), i.e. the target could not be reached."""
    cause = error.__cause__
    return (
        isinstance(error, Unavailable)
        and isinstance(cause, grpc.RpcError)
        and rich_status(cause) is None
    )


def for_error(error: TrellisError) -> ExitCode:
    """The exit code of a call that failed with ``error``."""
    if isinstance(error, Unauthenticated | PermissionDenied):
        return ExitCode.REFUSED
    if is_unreachable(error):
        return ExitCode.UNREACHABLE
    return ExitCode.FAILED


@dataclass(frozen=True)
class Target:
    """The service a command calls, as the person typed it (for messages)."""

    service: str
    address: str
    #: The option and variable that set the address, e.g.
    #: ``--target/TRELLIS_EXECUTOR_TARGET`` (empty: not the person's to choose).
    option: str = ""


#: Text of gRPC's own diagnostics, from a channel that could not connect or resolve.
_GRPC_DIAGNOSTICS = re.compile(
    r"failed to connect to all addresses|connections to all backends failing|last error:"
    r"|DNS resolution failed|\bipv[46]:\S+:\d+|\{\"created\":",
    re.IGNORECASE,
)


def plain(message: str) -> str:
    """An error message from a service (of the call, of a run or of a node) on one line,
    with gRPC diagnostics it relays from a hop behind it replaced by what they mean."""
    if _GRPC_DIAGNOSTICS.search(message):
        return "a service it depends on could not be reached (see its log)"
    return " ".join(message.split())


def describe(error: TrellisError, target: Target) -> list[str]:
    """What to print for ``error``: one line, then one per field at fault."""
    if is_unreachable(error):
        elsewhere = f", or set {target.option}" if target.option else ""
        return [
            f"cannot reach the {target.service} at {target.address}; is the stack running?"
            f" Start it with `trellis up` (or `make up`){elsewhere}"
        ]
    line = f"{error.reason}: {plain(error.message)}"
    if isinstance(error, Unauthenticated):
        line += (
            "; give an API key with --api-key or TRELLIS_API_KEY (`trellis up` prints a"
            " development key, `trellis keys new --tenant T` makes one)"
        )
    return [line, *(f"  {v.field}: {v.description}" for v in error.violations)]


def print_error(lines: list[str]) -> None:
    """``error <first line>`` and the rest, on stderr."""
    first, *rest = lines
    stderr.print(f"[red]error[/] {escape(first)}", soft_wrap=True)  # one line, however long
    for line in rest:
        stderr.print(escape(line), soft_wrap=True)


def fail(message: str, code: ExitCode) -> typer.Exit:
    """Print ``message`` as an error line; the ``typer.Exit`` to raise with ``code``."""
    print_error([message])
    return typer.Exit(code)


@contextmanager
def reported(target: Target) -> Iterator[None]:
    """Around a command's service calls: a ``TrellisError`` is printed (``describe``) and
    the command exits with its code (``for_error``)."""
    try:
        yield
    except TrellisError as error:
        print_error(describe(error, target))
        raise typer.Exit(for_error(error)) from None
