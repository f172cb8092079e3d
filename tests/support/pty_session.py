"""Drive ``trellis`` in a pseudo-terminal: press Ctrl-C once some text shows, or hold a
scripted conversation (wait for a prompt, type a line, wait for the text it should bring).

A pseudo-terminal needs ``fork()``, and forking the test process — which holds gRPC
channels and their threads — lets gRPC's fork handlers crash the child (SIGSEGV) before it
reaches ``exec``. So the tests call ``interrupt``/``converse`` here, which run this module
as a process of its own (``subprocess`` starts it without those fork handlers), and that
process does the pexpect work and prints what happened as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pexpect

REPO = Path(__file__).parents[2]


def interrupt(argv: Sequence[str], wait_for: str, env: Mapping[str, str]) -> dict:
    """``argv``'s exit status (negative: the signal that ended it) and output, Ctrl-C'd
    once ``wait_for`` shows; ``shown`` says whether it did."""
    return _in_own_process(["interrupt", wait_for, "60", *argv], env)


def converse(
    argv: Sequence[str], prompt: str, script: Sequence[tuple[str, str]], env: Mapping[str, str]
) -> dict:
    """``argv`` typed ``script`` (pairs of a line and the regular expression it should
    bring) at each ``prompt``, then ``/exit``; exit status, output and how many pairs
    were done (``error`` when it timed out or ended early)."""
    return _in_own_process(["converse", prompt, json.dumps(script), "60", *argv], env)


def _in_own_process(args: list[str], env: Mapping[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.pty_session", *args],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=150,
        check=True,
    )
    return json.loads(done.stdout)


def _exit_code(child: pexpect.spawn) -> int:
    return child.exitstatus if child.exitstatus is not None else -child.signalstatus


def _interrupt(argv: list[str], wait_for: str, timeout: float) -> dict[str, object]:
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=timeout)
    try:
        shown = child.expect([wait_for, pexpect.EOF]) == 0
        output = child.before + (child.after if shown else "")
        if shown:
            child.sendintr()
            child.expect(pexpect.EOF)
            output += child.before
        child.close()
        return {"code": _exit_code(child), "output": output, "shown": shown}
    finally:
        if child.isalive():
            child.kill(9)


def _converse(
    argv: list[str], prompt: str, script: list[tuple[str, str]], timeout: float
) -> dict[str, object]:
    child = pexpect.spawn(
        argv[0], argv[1:], encoding="utf-8", timeout=timeout, dimensions=(40, 120)
    )
    output = ""
    done = 0
    try:
        for line, expected in script:
            child.expect_exact(prompt)
            output += child.before + child.after
            child.sendline(line)
            child.expect(expected)
            output += child.before + child.after
            done += 1
        child.expect_exact(prompt)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        output += child.before
        child.close()
        return {"code": _exit_code(child), "output": output, "done": done}
    except (pexpect.TIMEOUT, pexpect.EOF) as error:
        return {
            "code": None,
            "output": output + str(child.before),
            "done": done,
            "error": type(error).__name__,
        }
    finally:
        if child.isalive():
            child.kill(9)


def main() -> None:
    mode, *rest = sys.argv[1:]
    if mode == "interrupt":
        wait_for, timeout, *argv = rest
        result = _interrupt(argv, wait_for, float(timeout))
    else:
        prompt, script, timeout, *argv = rest
        pairs = [(line, expected) for line, expected in json.loads(script)]
        result = _converse(argv, prompt, pairs, float(timeout))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
