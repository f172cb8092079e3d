"""The ``trellis`` command as a person runs it from a shell, for the CLI's tests: its own
process (and event loop), an environment without the caller's TRELLIS_*/OPENAI_* variables,
and what it printed and exited with."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

TRELLIS = Path(sys.executable).parent / "trellis"
#: Text of gRPC's diagnostics that must never reach the person.
DIAGNOSTICS = ("ipv4:", "ipv6:", "last error", "failed to connect", "Traceback", "debug_error")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return self.stderr.splitlines()

    def assert_no_diagnostics(self) -> None:
        for text in DIAGNOSTICS:
            assert text not in self.stdout + self.stderr, (text, self)


def clean_env(**env: str) -> dict[str, str]:
    """This environment without TRELLIS_*/OPENAI_* variables, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TRELLIS_", "OPENAI_"))}
    return {**base, "COLUMNS": "200", **env}


async def trellis(*args: str, **env: str) -> Result:
    """``trellis ARGS`` as a process, to its end (90 s at most)."""
    process = await asyncio.create_subprocess_exec(
        str(TRELLIS),
        *args,
        env=clean_env(**env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


async def trellis_run(*args: str, **env: str) -> Result:
    """``trellis run ARGS``."""
    return await trellis("run", *args, **env)
