"""Run a command in a pseudo-terminal and hold a scripted conversation with it: wait for
a prompt, type a line, wait for the text it should bring; print exit status, output and
how far the script got as JSON.

Run as its own process (``python -m tests.support.pty_conversation``), like
``pty_interrupt``: a pseudo-terminal needs ``fork()``, and forking the test process (it
holds gRPC channels and their threads) crashes the child with SIGSEGV.

Arguments: ``TIMEOUT PROMPT SCRIPT_JSON -- ARGV...``; the script is a JSON list of
``[line, expected]`` pairs (``expected`` a regular expression).
"""

from __future__ import annotations

import json
import sys

import pexpect


def converse(
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
        code = child.exitstatus if child.exitstatus is not None else -child.signalstatus
        return {"code": code, "output": output, "done": done}
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
    timeout, prompt, script, separator, *argv = sys.argv[1:]
    assert separator == "--"
    pairs = [(line, expected) for line, expected in json.loads(script)]
    print(json.dumps(converse(argv, prompt, pairs, float(timeout))))


if __name__ == "__main__":
    main()
