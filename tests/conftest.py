"""Shared fixtures: start real services on port 0 and give channels to them."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from trellis.runtime.channels import Channels
from trellis.runtime.ports import free_port
from trellis.runtime.server import Builder, RunningServer, start_service
from trellis.runtime.settings import ServiceSettings
from trellis_offline_model.server import RunningModel, start_offline_model

Serve = Callable[[str, Builder, ServiceSettings], Awaitable[RunningServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(name, build, settings)`` starts a real gRPC server; stopped after the test."""
    running: list[RunningServer] = []

    async def _serve(name: str, builder: Builder, settings: ServiceSettings) -> RunningServer:
        server = await start_service(settings, name, builder)
        running.append(server)
        return server

    yield _serve
    for server in reversed(running):
        await server.stop(0)


@pytest.fixture
async def channels() -> AsyncIterator[Channels]:
    """Client channels for the test itself."""
    chans = Channels()
    yield chans
    await chans.close()


@pytest.fixture
async def model() -> AsyncIterator[RunningModel]:
    """The offline rules model on a free port (tests may script its replies)."""
    running = await start_offline_model(port=0)
    yield running
    await running.stop()


class RedisServer:
    """A real ``redis-server`` the test owns: no persistence, loopback only, a free port.

    ``stop()`` kills it (SIGKILL, like a crash) and ``start()`` brings it back on the same
    port, empty, so tests can take the backend away under a running service and check
    that it recovers; ``pause()``/``resume()`` freeze it (a hung server, not a refused
    connection). Started with ``--save "" --appendonly no`` so nothing touches disk
    but the log in the test's tmp dir.

    TODO(ci): a testcontainers-style path (``RedisContainer("redis:7")``) would pin the
    server version, but there is no Docker here; CI installs ``redis-server`` instead.
    """

    def __init__(self, binary: str, workdir: Path) -> None:
        self._binary = binary
        self._workdir = workdir
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) on ``self.port`` and return once it answers PING."""
        if self._process is not None:
            raise RuntimeError("redis-server is already running")
        log = self._workdir / "redis.log"
        argv = [
            self._binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._workdir),
            "--logfile", str(log),
        ]  # fmt: skip
        self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if _answers_ping(self.port):
                return
            exited = self._process.poll() is not None
            if exited or time.monotonic() > deadline:
                self.stop()
                output = log.read_text() if log.exists() else "(no log)"
                pytest.fail(f"redis-server on port {self.port} did not start:\n{output}")
            time.sleep(0.02)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers."""
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server by its PID (no graceful shutdown: the backend just vanishes)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _free_port() -> int:
    return free_port()  # never the same port twice in one test process


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free port for this test; killed (by PID) afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: the Redis tests need a real server "
            "(apt-get install redis-server, or brew install redis)"
        )
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


#: Where the PostgreSQL tests create their databases (CI runs a server there).
POSTGRES_ADMIN_URL = os.environ.get(
    "TRELLIS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh, uniquely named PostgreSQL database for this test; dropped afterwards.

    Fails (does not skip) when no server answers: the PostgreSQL backend is a supported
    configuration, so its tests must not silently vanish from a run.
    """
    import asyncpg

    name = f"trellis_test_{uuid.uuid4().hex}"
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as error:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({error}); the run-store "
            "tests need a server (set TRELLIS_TEST_POSTGRES_URL to point at another one)"
        )
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
        yield f"{base}/{name}"
    finally:
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@dataclass
class ServiceProcess:
    """A Trellis service as its own OS process (``python -m <module>``) on a free port.

    For tests that need a real crash (SIGKILL) or real separate processes sharing a
    backend; its stdout and stderr go to ``log``, shown when it fails to start.
    """

    name: str
    service: str
    port: int
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def kill(self) -> None:
        """SIGKILL by PID: a crash, no graceful stop."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (graceful stop), SIGKILL if it takes more than 10 s."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    async def wait_serving(self, within: float = 30.0) -> None:
        """Return once the process answers grpc.health.v1 SERVING for its service."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + within
        request = health_pb2.HealthCheckRequest(service=self.service)
        async with grpc.aio.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    pytest.fail(
                        f"{self.name} exited with {self.process.returncode} during start-up:\n"
                        f"{self.output()}"
                    )
                try:
                    reply = await health.Check(request, timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{self.name} not SERVING after {within:g}s:\n{self.output()}")
                await asyncio.sleep(0.05)


class StartProcess(Protocol):
    def __call__(
        self, module: str, name: str, service: str, env_vars: dict[str, str], port: int = 0
    ) -> ServiceProcess: ...


@pytest.fixture
def service_process(tmp_path: Path) -> Iterator[StartProcess]:
    """``start(module, name, grpc_service, env, port=0)`` runs ``python -m module`` on
    ``port`` (0 = a free one; pass a stopped process's port to restart it in place).

    The environment is this one without TRELLIS_*/OTEL_* variables, plus ``env``; each
    process is SIGKILLed by PID after the test.
    """
    started: list[ServiceProcess] = []

    def start(
        module: str, name: str, service: str, env_vars: dict[str, str], port: int = 0
    ) -> ServiceProcess:
        port = port or _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRELLIS_", "OTEL_"))}
        env.update(
            PYTHONUNBUFFERED="1",
            OTEL_TRACES_EXPORTER="none",
            TRELLIS_HOST="127.0.0.1",
            TRELLIS_METRICS_PORT="0",
            # The executor's API-key check is on by default; tests about it turn it on.
            TRELLIS_AUTH="false",
        )
        env.update(env_vars)
        env["TRELLIS_PORT"] = str(port)
        log = tmp_path / f"{name}.log"
        with log.open("ab") as out:  # a restarted process appends to its log
            process = subprocess.Popen(
                [sys.executable, "-m", module],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(ServiceProcess(name, service, port, log, process))
        return started[-1]

    yield start
    for process in started:
        process.kill()


#: (name, module, gRPC service) of the five services, started in this order (callees first).
STACK_SERVICES = (
    ("cache", "trellis_cache", "trellis.cache.v1.CacheService"),
    ("costs", "trellis_costs", "trellis.costs.v1.CostAccountingService"),
    ("toolgateway", "trellis_toolgateway", "trellis.toolgateway.v1.ToolGatewayService"),
    ("planner", "trellis_planner", "trellis.planner.v1.PlannerService"),
    ("executor", "trellis_executor", "trellis.executor.v1.ExecutorService"),
)


@dataclass
class ProcessStack:
    """The five services as separate processes, wired to each other and to ``model``.

    Each service gets its own free gRPC port and metrics port (``metrics_ports``), its
    own SQLite files in the test's tmp dir unless ``env`` says otherwise, and the
    targets of the others. ``restart(name)`` starts a stopped/killed one on its port.
    """

    start: StartProcess
    env: dict[str, dict[str, str]]
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @property
    def executor_target(self) -> str:
        return self.processes["executor"].target

    def target(self, name: str) -> str:
        return self.processes[name].target

    async def restart(self, name: str) -> ServiceProcess:
        old = self.processes[name]
        old.stop()
        module = dict((n, m) for n, m, _ in STACK_SERVICES)[name]
        self.processes[name] = self.start(module, name, old.service, self.env[name], old.port)
        await self.processes[name].wait_serving()
        return self.processes[name]


StartStack = Callable[..., Awaitable[ProcessStack]]


@pytest.fixture
def process_stack(service_process: StartProcess, model: RunningModel, tmp_path: Path) -> StartStack:
    """``await start(env={...}, per_service={"costs": {...}})`` runs the five services as
    processes (each SIGKILLed after the test). ``env`` goes to all, ``per_service`` to one.
    """

    async def start(
        env: dict[str, str] | None = None, per_service: dict[str, dict[str, str]] | None = None
    ) -> ProcessStack:
        ports = {name: _free_port() for name, _, _ in STACK_SERVICES}
        common = {f"TRELLIS_{name.upper()}_TARGET": f"127.0.0.1:{p}" for name, p in ports.items()}
        common["OPENAI_BASE_URL"] = model.base_url
        common["OPENAI_API_KEY"] = "offline"
        stack = ProcessStack(service_process, {})
        for name, module, service in STACK_SERVICES:
            stack.metrics_ports[name] = _free_port()
            stack.env[name] = {
                **common,
                "TRELLIS_DATABASE_URL": f"sqlite:///{tmp_path}/{name}.db",
                "TRELLIS_OUTBOX_PATH": str(tmp_path / f"{name}-outbox.db"),
                "TRELLIS_METRICS_PORT": str(stack.metrics_ports[name]),
                **(env or {}),
                **(per_service or {}).get(name, {}),
            }
            stack.processes[name] = service_process(
                module, name, service, stack.env[name], ports[name]
            )
        for process in stack.processes.values():
            await process.wait_serving()
        return stack

    return start


class PrometheusServer:
    """A real ``prometheus`` the test owns, scraping the test's targets every second.

    Started on a free loopback port with a generated config, its own TSDB in the test's
    tmp dir, and its log there too (shown when it fails). ``query(expr)`` runs an
    instant query through the HTTP API and fails the test unless Prometheus accepts it;
    ``wait_for(expr, predicate)`` polls until the result satisfies ``predicate``.
    """

    def __init__(
        self,
        binary: str,
        workdir: Path,
        targets: dict[str, list[str]],
        rule_files: list[Path] | tuple[Path, ...] = (),
    ) -> None:
        import httpx
        import yaml

        self.port = _free_port()
        self.workdir = workdir
        self.log = workdir / "prometheus.log"
        self.config = workdir / "prometheus.yml"
        scrape_configs = [
            {"job_name": job, "static_configs": [{"targets": list(addresses)}]}
            for job, addresses in targets.items()
        ]
        self.config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(Path(path).resolve()) for path in rule_files],
                    "scrape_configs": scrape_configs,
                },
                sort_keys=False,
            )
        )
        argv = [
            binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log.open("ab") as out:
            self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.http = httpx.AsyncClient(base_url=self.url, timeout=10.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    async def wait_ready(self, within: float = 30.0) -> None:
        """Return once ``/-/ready`` answers 200."""
        import httpx

        deadline = time.monotonic() + within
        while True:
            if self._process is None or self._process.poll() is not None:
                code = self._process.returncode if self._process else None
                pytest.fail(f"prometheus exited with {code} during start-up:\n{self.output()}")
            try:
                if (await self.http.get("/-/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after {within:g}s:\n{self.output()}")
            await asyncio.sleep(0.1)

    async def api(self, expr: str) -> dict:
        """The whole JSON answer of ``/api/v1/query`` for ``expr`` (status and all)."""
        response = await self.http.get("/api/v1/query", params={"query": expr})
        return response.json()

    async def query(self, expr: str) -> list[dict]:
        """The result vector of an instant query; fails the test if Prometheus refuses it."""
        body = await self.api(expr)
        if body.get("status") != "success":
            error = f"{body.get('errorType')}: {body.get('error')}"
            pytest.fail(f"prometheus refused {expr!r}: {error}")
        return body["data"]["result"]

    async def value(self, expr: str) -> float | None:
        """The single sample value of ``expr`` (None when the result is empty)."""
        result = await self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr!r} returned {len(result)} series: {result}"
        return float(result[0]["value"][1])

    async def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict]], bool] = bool,
        within: float = 30.0,
    ) -> list[dict]:
        """Poll ``expr`` until ``predicate(result)`` holds; fail with the last result if not."""
        deadline = time.monotonic() + within
        while True:
            result = await self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"{expr!r} did not reach the expected result in {within:g}s: {result}")
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        """SIGTERM by PID (it flushes its TSDB head), SIGKILL after 10 s."""
        await self.http.aclose()
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


class StartPrometheus(Protocol):
    def __call__(
        self, targets: dict[str, list[str]], rule_files: list[Path] | tuple[Path, ...] = ()
    ) -> Awaitable[PrometheusServer]: ...


@pytest.fixture
async def prometheus_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[StartPrometheus]:
    """``prom = await prometheus_server({"job": ["127.0.0.1:port", ...]}, rule_files=[...])``
    starts a real Prometheus (Debian's ``prometheus`` package) on a free port scraping
    those targets and evaluating those rule files every second, and returns once it is
    ready; stopped by PID after the test.
    """
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "prometheus is not installed: the metrics tests need a real server "
            "(`make system-deps`, or apt-get install prometheus)"
        )
    started: list[PrometheusServer] = []

    async def start(
        targets: dict[str, list[str]], rule_files: list[Path] | tuple[Path, ...] = ()
    ) -> PrometheusServer:
        workdir = tmp_path_factory.mktemp("prometheus")
        server = PrometheusServer(binary, workdir, targets, rule_files)
        started.append(server)
        await server.wait_ready()
        return server

    yield start
    for server in started:
        await server.stop()


class PostgresCluster:
    """A throwaway PostgreSQL cluster the test owns (``initdb`` + ``pg_ctl``), for tests
    that restart or stop the database under running services - never the machine's server.

    Its data directory, socket and log live in a private temp dir; it listens on
    127.0.0.1 and a free port with trust authentication, fsync off. PostgreSQL refuses to
    run as root, so as root every command runs as the ``postgres`` OS user (``runuser``),
    in a dir that user owns. ``restart()`` is ``pg_ctl restart -m fast``: every
    connection is cut and transactions in flight roll back, as in a real restart.
    """

    def __init__(self, bin_dir: Path, workdir: Path) -> None:
        self._bin = bin_dir
        self.workdir = workdir
        self.data = workdir / "data"
        self.log = workdir / "postgres.log"
        self.port = _free_port()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> None:
        argv = [str(self._bin / tool), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(
            argv, cwd=self.workdir, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            pytest.fail(
                f"{tool} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n{self.output()}"
            )

    def _options(self) -> str:
        return f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
                  "-o", self._options(), "start")  # fmt: skip

    def restart(self) -> None:
        """``pg_ctl restart -m fast``; returns once the server accepts connections again."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
                  "-m", "fast", "-o", self._options(), "restart")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", mode, "stop")

    @property
    def pid(self) -> int | None:
        """The postmaster's PID (None when it is not running)."""
        pid_file = self.data / "postmaster.pid"
        try:
            return int(pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    async def create_database(self, name: str) -> str:
        """A new database in this cluster; its URL."""
        import asyncpg

        admin = await asyncpg.connect(self.url(), timeout=10)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return self.url(name)


@pytest.fixture
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster, started; stopped (``-m immediate``, then SIGKILL of
    its postmaster by PID) and deleted after the test. Fails when PostgreSQL's server
    binaries (``/usr/lib/postgresql/<version>/bin``) are not installed."""
    import contextlib
    import glob
    import pwd
    import tempfile

    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
    )
    if not found:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    workdir = Path(tempfile.mkdtemp(prefix="trellis-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
    cluster = PostgresCluster(Path(found[-1]).parent, workdir)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        pid = cluster.pid
        if pid is not None:
            try:
                cluster.stop("immediate")
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)


ServeHttp = Callable[[Any], Awaitable[int]]


@pytest.fixture
async def http_app() -> AsyncIterator[ServeHttp]:
    """``port = await http_app(app)`` serves an aiohttp ``web.Application`` on a free
    loopback port (a test's HTTP tool backend); cleaned up after the test."""
    from aiohttp import web

    runners: list[web.AppRunner] = []

    async def serve(app: web.Application) -> int:
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    yield serve
    for runner in reversed(runners):
        await runner.cleanup()
