"""The rules without HTTP: tokenizer, planning, answering, prompt dispatch."""

import json

from trellis_offline_model import answering, planning
from trellis_offline_model.rules import FALLBACK
from trellis_offline_model.rules import respond as reply
from trellis_offline_model.tokens import count_tokens, pieces

COMMANDS = (
    "Run one read-only system command. The command must be exactly one of these:\n"
    "- `uname -a`: operating system, os, kernel, system, platform\n"
    "- `df -h`: disk, disk usage, disk space, storage, filesystem, free space\n"
    "- `uptime`: uptime, load, load average, running\n"
    "- `date -u`: date, time, clock\n"
)
CATALOG = [
    {"name": "run_command", "description": COMMANDS, "input_schema": {}},
    {"name": "arithmetic", "description": "Evaluate an expression.", "input_schema": {}},
    {"name": "sleep", "description": "Wait.", "input_schema": {}},
    {"name": "echo", "description": "Return the value.", "input_schema": {}},
]


def respond(messages: list[dict]) -> str:
    return reply({"messages": messages}).text


def calls(goal: str) -> list[tuple[str, dict, list[str]]]:
    return [(n["tool"], n["args"], n["depends_on"]) for n in planning.plan(goal, CATALOG)]


def test_tokenizer_counts_words_and_punctuation_and_pieces_rejoin() -> None:
    assert count_tokens('{"a": 12}') == 7  # { " a " : 12 }
    text = '{"node_id": "n1"}\n  two  words \n'
    assert "".join(pieces(text)) == text
    assert len(pieces(text)) > 4


def test_demo_goal_plans_three_independent_commands_in_description_order() -> None:
    assert calls("Report this machine's OS, disk usage and uptime") == [
        ("run_command", {"command": "uname -a"}, []),
        ("run_command", {"command": "df -h"}, []),
        ("run_command", {"command": "uptime"}, []),
    ]


def test_keywords_match_whole_words_only_and_each_command_once() -> None:
    assert calls("disk space and disk usage") == [("run_command", {"command": "df -h"}, [])]
    assert calls("How is the cosmos?") == []  # "os" inside a word is no match
    assert calls("run `date -u` please") == [("run_command", {"command": "date -u"}, [])]


def test_arithmetic_expressions_are_found_in_the_goal() -> None:
    assert calls("What is (17*23)+4?") == [("arithmetic", {"expression": "(17*23)+4"}, [])]
    assert calls("compute 2**10 - 24.") == [("arithmetic", {"expression": "2**10 - 24"}, [])]
    assert calls("add 1 + 2 and 3 * 4") == [
        ("arithmetic", {"expression": "1 + 2"}, []),
        ("arithmetic", {"expression": "3 * 4"}, []),
    ]
    assert calls("the year 2024 had 366 days") == []


def test_sleep_echo_and_a_chained_echo() -> None:
    assert calls('sleep 200 ms and echo "hello"') == [
        ("sleep", {"ms": 200}, []),
        ("echo", {"value": "hello"}, []),
    ]
    assert calls("sleep 2 seconds") == [("sleep", {"ms": 2000}, [])]
    assert calls("compute 6*7 then echo the result") == [
        ("arithmetic", {"expression": "6*7"}, []),
        ("echo", {"value": "$n1"}, ["n1"]),
    ]


def test_tools_missing_from_the_catalog_are_never_planned() -> None:
    assert planning.plan("What is 1+1? And the uptime?", CATALOG[2:]) == []


def test_answer_has_an_intro_and_one_bullet_per_node() -> None:
    text = answering.answer(
        "Report",
        [
            {
                "node_id": "n1",
                "tool": "run_command",
                "args": {"command": "df -h"},
                "status": "SUCCEEDED",
                "output": {"stdout": "Filesystem Size\n/dev/sda 10G\n"},
            },
            {
                "node_id": "n2",
                "tool": "arithmetic",
                "args": {"expression": "1+2"},
                "status": "SUCCEEDED",
                "output": {"result": 3},
            },
            {
                "node_id": "n3",
                "tool": "run_command",
                "args": {"command": "uptime"},
                "status": "FAILED",
                "error": {"code": "TOOL_TIMEOUT", "message": "too slow"},
            },
            {"node_id": "n4", "tool": "echo", "args": {"value": "$n3"}, "status": "SKIPPED"},
        ],
    )
    assert text.splitlines() == [
        "Results for: Report",
        "- `df -h`: Filesystem Size / /dev/sda 10G",
        "- 1+2 = 3",
        "- `uptime` failed (TOOL_TIMEOUT: too slow)",
        '- echo {"value": "$n3"} was skipped because a call it depends on failed',
    ]
    assert "nothing to report" in answering.answer("x", [])


def test_respond_dispatches_on_the_prompt_sections() -> None:
    tools = "\n".join(json.dumps(t) for t in CATALOG)
    plan = respond(
        [
            {"role": "system", "content": f"Plan.\n\n## Tools\nOne per line.\n{tools}\n"},
            {"role": "user", "content": "What is 2+2?"},
        ]
    )
    assert [json.loads(line) for line in plan.splitlines()] == [
        {"node_id": "n1", "tool": "arithmetic", "args": {"expression": "2+2"}, "depends_on": []}
    ]
    outcome = {
        "node_id": "n1",
        "tool": "arithmetic",
        "args": {"expression": "2+2"},
        "status": "SUCCEEDED",
        "output": {"result": 4},
    }
    joined = respond(
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "user", "content": f"Outcomes:\n{json.dumps(outcome)}"},
        ]
    )
    assert joined == "Results for: What is 2+2?\n- 2+2 = 4"
    assert respond([{"role": "user", "content": "hello"}]) == FALLBACK
    assert "rule-based" in FALLBACK


def test_a_replan_continues_after_the_previous_node_ids() -> None:
    tools = "\n".join(json.dumps(t) for t in CATALOG)
    previous = json.dumps({"node_id": "n2", "tool": "sleep", "args": {"ms": 1}})
    plan = respond(
        [
            {"role": "system", "content": f"## Tools\n{tools}"},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "user", "content": f"## Previous plan\n{previous}\n\n## Why\nmore"},
        ]
    )
    assert [json.loads(line)["node_id"] for line in plan.splitlines()] == ["n3"]
