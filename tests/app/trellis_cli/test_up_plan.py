"""What `trellis up` gives each child (ports, addresses, nothing inherited) and how it reads
a child's last error line; the processes themselves are tests/e2e/test_up.py."""

import json

from trellis_cli.up import (
    MODEL,
    SERVICES,
    child_env,
    error_line,
    planned_processes,
    process_env,
)


def test_port_base_moves_every_port_into_one_block() -> None:
    specs = {s.name: s for s in planned_processes({}, port_base=41000)}
    assert specs[MODEL.name].port == 41000
    assert {n: (s.port, s.metrics_port) for n, s in specs.items() if n != MODEL.name} == {
        "executor": (41001, 41011),
        "planner": (41002, 41012),
        "toolgateway": (41003, 41013),
        "cache": (41004, 41014),
        "costs": (41005, 41015),
    }
    assert planned_processes({}) == [MODEL, *SERVICES]  # no base: the documented defaults


def test_children_get_their_own_ports_and_the_stacks_addresses_not_inherited_ones() -> None:
    parent = {
        "PATH": "/bin",
        "TRELLIS_PORT": "1",
        "TRELLIS_METRICS_PORT": "2",
        "TRELLIS_HOST": "0.0.0.0",
        "TRELLIS_PLANNER_TARGET": "elsewhere:1",
        "TRELLIS_OFFLINE_MODEL_PORT": "3",
        "TRELLIS_LOG_LEVEL": "debug",  # not a port or address: it is passed on
    }
    specs = planned_processes(parent, port_base=41000)
    shared = child_env(parent, specs)
    assert shared["TRELLIS_LOG_LEVEL"] == "debug" and shared["PATH"] == "/bin"
    assert "TRELLIS_PORT" not in shared and "TRELLIS_OFFLINE_MODEL_PORT" not in shared
    assert shared["TRELLIS_PLANNER_TARGET"] == "127.0.0.1:41002"
    assert shared["OPENAI_BASE_URL"] == "http://127.0.0.1:41000/v1"
    by_name = {s.name: s for s in specs}
    planner = process_env(shared, by_name["planner"])
    assert (planner["TRELLIS_HOST"], planner["TRELLIS_PORT"]) == ("127.0.0.1", "41002")
    assert planner["TRELLIS_METRICS_PORT"] == "41012"
    model = process_env(shared, by_name[MODEL.name])
    assert model["TRELLIS_OFFLINE_MODEL_PORT"] == "41000" and "TRELLIS_PORT" not in model


def test_an_endpoint_of_the_parent_is_kept_and_no_model_is_started() -> None:
    parent = {"OPENAI_BASE_URL": "https://api.example.com/v1"}
    specs = planned_processes(parent)
    assert MODEL not in specs
    assert child_env(parent, specs)["OPENAI_BASE_URL"] == "https://api.example.com/v1"


def test_error_line_reads_json_logs_and_plain_text() -> None:
    info = {"event": "serving", "level": "info"}
    failed = {"event": "cannot open the store", "level": "error", "error": "disk full"}
    crashed = {
        "event": "crashed",
        "level": "critical",
        "exception": "Traceback\n  x\nKeyError: 'a'",
    }
    assert error_line(json.dumps(info)) is None
    assert error_line(json.dumps(failed)) == "cannot open the store: disk full"
    assert error_line(json.dumps(crashed)) == "crashed: KeyError: 'a'"
    assert error_line("trellis-costs: TRELLIS_PORT=1: port already in use\n") == (
        "trellis-costs: TRELLIS_PORT=1: port already in use"
    )
    assert error_line("   \n") is None
