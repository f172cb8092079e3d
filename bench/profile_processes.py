"""Where each service process spends its CPU under the throughput load: py-spy profiles.

``python -m bench.profile_processes [--backend sqlite|postgres] [--seconds 10]`` starts
the stack as five processes exactly as ``bench.process_bench`` does (API keys on, every
span exported over OTLP/gRPC to the sink), warms it up, then records each service with
``py-spy record --nonblocking`` (sampling without pausing the process, so the profile
does not slow what it measures) while 50 clients run the 5-node echo plan. py-spy only
samples threads that are running, so samples are CPU time.

For each process it prints the top functions by *self* time (the frame on top of the
stack), by *inclusive* time (anywhere on the stack), and self time grouped by package
(``opentelemetry``, ``grpc``, ``aiosqlite``, ``trellis_executor``...). ``--out DIR`` keeps
the raw collapsed stacks (``<service>.txt``, flame-graph input) and ``profile.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench import proc_cpu
from bench.dag_common import timed_run
from bench.executor_bench import drive_echo_runs, echo_plan
from bench.otlp_sink import start_sink
from bench.process_bench import BACKENDS, running_stack
from trellis.executor.v1 import executor_pb2

#: ``func (path/to/file.py:123)`` -> the function and file, line dropped.
_LINE = re.compile(r":\d+\)$")
#: Paths (py-spy's full file names) are shown from the package on: after site-packages/,
#: the repository's source roots, or the standard library's directory.
_ROOTS = ("/site-packages/", "/libs/", "/services/", "/app/", "/lib/python3.")
#: Packages named by two parts, so the SDK, exporter and instrumentation are told apart.
_TWO_PARTS = ("opentelemetry", "trellis")
#: Frames under every stack (the event loop, threads, start-up): left out of *inclusive*.
_PLUMBING = ("asyncio", "selectors", "threading", "runpy", "<frozen runpy>", "concurrent")


def _frame(raw: str) -> str:
    frame = _LINE.sub(")", raw.strip())
    head, _, path = frame.partition(" (")
    for root in _ROOTS:
        if root in path:
            path = path.rsplit(root, 1)[-1]
            if root == "/lib/python3.":  # "11/asyncio/events.py)" -> "asyncio/events.py)"
                path = path.split("/", 1)[-1]
            break
    return f"{head} ({path}"


def _package(frame: str) -> str:
    """The package of a frame's file (``opentelemetry/sdk``, ``grpc``, ``asyncio``,
    ``trellis_executor``); a standard-library module by its name."""
    path = frame.rpartition(" (")[2].rstrip(")")
    parts = path.split("/")
    if parts[0] in _TWO_PARTS and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py") or "?"


def _plumbing(frame: str) -> bool:
    return _package(frame) in _PLUMBING or "__main__" in frame or "run_service" in frame


def summarize(collapsed: str, top: int) -> dict[str, Any]:
    """Self, inclusive and per-package self shares of one process's collapsed stacks."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        frames = [f for f in frames if not f.startswith("process ")] or frames
        total += count
        self_time[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            if not _plumbing(frame):
                inclusive[frame] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(n / total, 4)) for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "self": share(self_time) if total else [],
        "inclusive": share(inclusive) if total else [],
        "packages": share(packages) if total else [],
    }


def print_profile(name: str, profile: dict[str, Any], cpu_seconds: float) -> None:
    print(f"\n=== {name}: {profile['samples']} samples, {cpu_seconds:.2f} CPU s ===")
    for title in ("packages", "self", "inclusive"):
        print(f"-- {title} --")
        for frame, part in profile[title]:
            print(f"  {part * 100:5.1f}%  {frame}")


async def _record(pid: int, seconds: float, rate: int, out: Path) -> asyncio.subprocess.Process:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return await asyncio.create_subprocess_exec(
        spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--nonblocking",
        "--full-filenames",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def profile(backend: str, seconds: float, rate: int, top: int, out: Path) -> dict[str, Any]:

    sink = await start_sink()
    results: dict[str, Any] = {"backend": backend, "seconds": seconds, "rate": rate}
    try:
        async with running_stack(backend, out / "stack", sink) as (stack, client):
            for _ in range(20):  # warm-up: imports, pools, caches
                await timed_run(client, executor_pb2.RunRequest(plan=echo_plan()))
            pids = stack.service_pids
            before = proc_cpu.snapshot(pids)
            spies = {
                name: await _record(pid, seconds, rate, out / f"{name}.txt")
                for name, pid in pids.items()
            }
            waiting = asyncio.gather(*(spy.communicate() for spy in spies.values()))
            nodes = 0
            while not waiting.done():  # keep the load on until every recorder has finished
                walls, _ = await drive_echo_runs(client, clients=50, runs_each=2)
                nodes += len(walls) * len(echo_plan())
            outputs = await waiting
            spent = proc_cpu.spent(before, proc_cpu.snapshot(pids))
        results["nodes"] = nodes
        results["cpu_ms_per_node"] = round(sum(spent.values()) / max(nodes, 1), 3)
        results["processes"] = {}
        for (name, spy), (_, stderr) in zip(spies.items(), outputs, strict=True):
            path = out / f"{name}.txt"
            if spy.returncode != 0 or not path.exists():
                raise RuntimeError(f"py-spy on {name} failed: {stderr.decode(errors='replace')}")
            summary = summarize(path.read_text(), top)
            summary["cpu_s"] = round(spent[name] / 1000, 2)
            summary["cpu_ms_per_node"] = round(spent[name] / max(nodes, 1), 3)
            results["processes"][name] = summary
    finally:
        await sink.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_processes", description=__doc__)
    parser.add_argument("--backend", choices=BACKENDS, default="sqlite")
    parser.add_argument("--seconds", type=float, default=10.0, help="py-spy recording time")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    parser.add_argument("--out", type=Path, help="keep the collapsed stacks and profile.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trellis-profile-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        results = asyncio.run(profile(args.backend, args.seconds, args.rate, args.top, out))
        (out / "profile.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"{args.backend}: {results['nodes']} nodes under py-spy, "
        f"{results['cpu_ms_per_node']} CPU ms per node (five services)"
    )
    for name, summary in results["processes"].items():
        print_profile(name, summary, summary["cpu_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
