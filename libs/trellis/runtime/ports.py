"""Whether a TCP port can be listened on, asked before anything binds it.

gRPC reports a busy port late and noisily (a ``RuntimeError`` and a C-core log line, after
the service was built), and the metrics server with a bare ``OSError``. Services ask here
first, so a busy port stops them with one line naming its setting
(``TRELLIS_PORT=50054: port already in use``); ``trellis up`` asks for every port of its
stack before it starts anything.
"""

from __future__ import annotations

import errno
import socket

from trellis.runtime.settings import StartupError


def bind_error(host: str, port: int) -> OSError | None:
    """The error listening on ``host:port`` would meet now; None when it is free.

    The probe sets SO_REUSEADDR as servers do, so connections of a stopped server still in
    TIME_WAIT do not count, and leaves SO_REUSEPORT off, so any listener does.
    A host that resolves to several addresses (``localhost``) is free when one of them is
    bindable and none is in use.
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        return error
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return error
                errors.append(error)
    return errors[0] if len(errors) == len(infos) and errors else None


def describe(variable: str, host: str, port: int, error: OSError) -> str:
    """One line: the setting, its value and why the port cannot be used."""
    if error.errno == errno.EADDRINUSE:
        return f"{variable}={port}: port already in use"
    reason = error.strerror or str(error)
    return f"{variable}={port}: cannot listen on {host}:{port} ({reason})"


def check_port(host: str, port: int, variable: str) -> None:
    """Raise ``StartupError`` naming ``variable`` unless ``host:port`` can be listened on
    (port 0, "any free port", always can)."""
    if port == 0:
        return
    error = bind_error(host, port)
    if error is not None:
        raise StartupError(describe(variable, host, port, error))


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, never one this process handed out before.

    The OS may give the same ephemeral port to two probes in a row once the first is
    closed, so a stack whose ports are picked one after another could get one port
    twice (a service's gRPC and metrics ports); remembering them rules that out.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
