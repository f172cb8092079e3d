"""Run a command in a pseudo-terminal, press Ctrl-C once some text shows, and print its exit
status and output as JSON.

Run as its own process (``python -m tests.support.pty_interrupt``) because a pseudo-terminal
needs ``fork()``, and forking the test process — which holds gRPC channels and their threads —
lets gRPC's fork handlers crash the child (SIGSEGV) before it reaches ``exec``.
"""

from __future__ import annotations

import json
import sys

import pexpect


def interrupt(argv: list[str], wait_for: str, timeout: float) -> dict[str, object]:
    """Exit status (negative: killed by that signal) and output of ``argv``, Ctrl-C'd once
    ``wait_for`` shows; ``shown`` says whether it did."""
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=timeout)
    try:
        shown = child.expect([wait_for, pexpect.EOF]) == 0
        before = child.before + (child.after if shown else "")
        if shown:
            child.sendintr()
            child.expect(pexpect.EOF)
            before += child.before
        child.close()
        code = child.exitstatus if child.exitstatus is not None else -child.signalstatus
        return {"code": code, "output": before, "shown": shown}
    finally:
        if child.isalive():
            child.kill(9)


def main() -> None:
    wait_for, timeout, *argv = sys.argv[1:]
    print(json.dumps(interrupt(argv, wait_for, float(timeout))))


if __name__ == "__main__":
    main()
