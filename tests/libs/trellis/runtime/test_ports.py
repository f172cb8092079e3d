"""The port probe services and `trellis up` ask before binding: busy, free, not bindable."""

import socket
from collections.abc import Iterator

import pytest

from trellis.runtime.ports import bind_error, check_port
from trellis.runtime.settings import StartupError


@pytest.fixture
def listener() -> Iterator[int]:
    """A port something listens on (this test's own socket)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_listened_port_is_busy_and_named_by_its_setting(listener: int) -> None:
    error = bind_error("127.0.0.1", listener)
    assert error is not None
    with pytest.raises(StartupError) as raised:
        check_port("127.0.0.1", listener, "TRELLIS_PORT")
    assert str(raised.value) == f"TRELLIS_PORT={listener}: port already in use"


def test_a_listener_on_every_address_makes_loopback_busy_too() -> None:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        assert bind_error("127.0.0.1", sock.getsockname()[1]) is not None


def test_a_free_port_and_port_zero_pass() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert bind_error("127.0.0.1", port) is None
    check_port("127.0.0.1", port, "TRELLIS_PORT")
    check_port("127.0.0.1", 0, "TRELLIS_PORT")  # "any free port" is never busy


def test_an_address_that_is_not_this_machines_says_why() -> None:
    with pytest.raises(StartupError) as raised:
        check_port("192.0.2.1", 50999, "TRELLIS_PORT")  # TEST-NET-1: on no interface here
    message = str(raised.value)
    assert message.startswith("TRELLIS_PORT=50999: cannot listen on 192.0.2.1:50999 (")
    assert "in use" not in message
