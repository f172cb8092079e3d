"""The offline model's memory rules: follow-ups of the previous turn, and the fold."""

from __future__ import annotations

import pytest

from trellis_offline_model import follow_up, rules

TWO_PLUS_TWO = {
    "turn": 1,
    "goal": "what is 2+2",
    "answer": "Results for: what is 2+2\n- 2+2 = 4",
    "results": [{"tool": "arithmetic", "status": "SUCCEEDED", "output": "4"}],
}


@pytest.mark.parametrize(
    ("goal", "standalone"),
    [
        ("and multiply that by 3", "4 * 3"),
        ("Multiply it by 2.5", "4 * 2.5"),
        ("now divide the result by 2", "4 / 2"),
        ("add 5 to it", "4 + 5"),
        ("subtract 1 from that", "4 - 1"),
        ("that plus 10", "4 + 10"),
        ("double it", "4 * 2"),
        ("now the disk usage of /tmp", "now the disk usage of /tmp"),
        ("what is 3+3", "what is 3+3"),
    ],
)
def test_follow_ups_of_a_result(goal: str, standalone: str) -> None:
    assert follow_up.resolve(goal, [TWO_PLUS_TWO]) == standalone


def test_the_same_for_another_value() -> None:
    weather = {"turn": 1, "goal": "the weather in Paris", "answer": "sunny"}
    assert follow_up.resolve("and the same for Oslo", [weather]) == "the weather in Oslo"
    disk = {"turn": 1, "goal": "disk usage of /var/log", "answer": "12G"}
    assert follow_up.resolve("what about /tmp?", [disk]) == "disk usage of /tmp"


def test_no_previous_turn_or_number_keeps_the_goal() -> None:
    assert follow_up.resolve("and multiply that by 3", []) == "and multiply that by 3"
    words = {"turn": 1, "goal": "say hi", "answer": "hi there"}
    assert follow_up.resolve("and multiply that by 3", [words]) == "and multiply that by 3"


def test_a_number_from_the_answer_when_no_tool_gave_one() -> None:
    turn = {"turn": 1, "goal": "how many?", "answer": "There are 42 of them."}
    assert follow_up.resolve("multiply that by 2", [turn]) == "42 * 2"


def test_condense_keeps_the_newest_lines_within_its_size() -> None:
    turns = [{"turn": n, "goal": f"goal {n}", "answer": f"answer {n}"} for n in range(1, 30)]
    text = follow_up.condense("Turn 0: start -> begun", turns, max_chars=200)
    assert len(text) <= 200
    assert text.splitlines()[-1] == "Turn 29: goal 29 -> answer 29"
    assert follow_up.condense("", turns[:2], 1000) == (
        "Turn 1: goal 1 -> answer 1\nTurn 2: goal 2 -> answer 2"
    )


def test_a_plan_request_of_a_turn_plans_the_follow_up() -> None:
    catalog = '{"name": "arithmetic", "description": "Evaluate an arithmetic expression",'
    catalog += ' "input_schema": {"type": "object", "properties": {"expression":'
    catalog += ' {"type": "string"}}, "required": ["expression"]}}'
    system = f"plan\n{catalog}\n## Conversation so far\n" + (
        '{"turn": 1, "goal": "what is 2+2", "answer": "- 2+2 = 4"}'
    )
    body = {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "and multiply that by 3"},
        ]
    }
    reply = rules.respond(body)
    assert '"expression": "4 * 3"' in reply.text


def test_a_fold_request_is_condensed() -> None:
    body = {
        "max_completion_tokens": 100,
        "messages": [
            {"role": "system", "content": "You are the memory of Trellis."},
            {
                "role": "user",
                "content": '{"summary": "Turn 1: a -> b", "through_turn": 1}\n'
                '{"turn": 2, "goal": "what is 2+2", "answer": "4"}',
            },
        ],
    }
    assert rules.respond(body).text == "Turn 1: a -> b\nTurn 2: what is 2+2 -> 4"
