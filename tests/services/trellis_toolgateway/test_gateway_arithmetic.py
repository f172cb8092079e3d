"""The arithmetic evaluator: values and precedence, rejected syntax, failures, DoS bounds."""

import time

import pytest

from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.tools.arithmetic import (
    MAX_EXPONENT,
    MAX_EXPRESSION_CHARS,
    ArithmeticFailure,
    ArithmeticTool,
    ExpressionError,
    evaluate,
)
from trellis_toolgateway.tools.base import ToolError


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 3 ** 2", 512),  # right-associative
        ("-2 ** 2", -4),  # ** binds tighter than unary minus
        ("(-2) ** 2", 4),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("10 - 4 - 3", 3),  # left-associative
        ("+5", 5),
        ("2 ** -1", 0.5),
        ("1.5e3 + 0.25", 1500.25),
        ("sqrt(16) + abs(-2)", 6.0),
        ("round(2.567, 2)", 2.57),
        ("round(2.5)", 2),
        ("min(3, 1, 2) + max(4, 5)", 6),
        ("  ( 1 +\t1 )  ", 2),
        ("10 ** 100", 10**100),
    ],
)
def test_values_and_precedence(expression: str, expected: float) -> None:
    assert evaluate(expression) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "1 +",
        "",
        "x",
        "__import__('os').system('id')",
        "(1).real",
        "'a' * 3",
        "1 if 1 else 0",
        "[1, 2]",
        "1 < 2",
        "1 and 2",
        "True + 1",
        "1j * 2",
        "abs(x=1)",
        "sqrt(1, 2)",
        "max()",
        "min(*[1, 2])",
        "lambda: 1",
        "1; 2",
        "1 << 2",
        "~1",
        "open('/etc/passwd')",
    ],
)
def test_disallowed_expressions_are_expression_errors(expression: str) -> None:
    with pytest.raises(ExpressionError):
        evaluate(expression)


@pytest.mark.parametrize(
    "expression", ["1 / 0", "1 // 0", "1 % 0", "1.0 / 0.0", "sqrt(-1)", "(-8) ** 0.5", "0 ** -1"]
)
def test_arithmetic_failures(expression: str) -> None:
    with pytest.raises(ArithmeticFailure):
        evaluate(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "9**9**9**9",
        "2 ** 10000",
        "10 ** 101",
        "(10 ** 60) * (10 ** 60)",
        "1e308 * 10",
        "99999999999 ** 999",
        "-(10 ** 99) * 100",
    ],
)
def test_huge_results_fail_fast_instead_of_hanging(expression: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ArithmeticFailure):
        evaluate(expression)
    assert time.perf_counter() - start < 0.05


def test_exponent_is_bounded_even_when_the_result_would_be_small() -> None:
    # 1 ** 10**9 is cheap, but the bound is on the exponent itself: simple and predictable.
    with pytest.raises(ArithmeticFailure, match="exponent"):
        evaluate(f"1 ** {MAX_EXPONENT + 1}")
    assert evaluate(f"1 ** {MAX_EXPONENT}") == 1


def test_expression_length_and_round_digits_are_bounded() -> None:
    with pytest.raises(ExpressionError, match="longer than"):
        evaluate("1+" * MAX_EXPRESSION_CHARS + "1")
    with pytest.raises(ExpressionError, match="round"):
        evaluate("round(5, -1000000)")


async def test_tool_maps_bad_expression_to_invalid_argument_on_args_expression() -> None:
    with pytest.raises(InvalidArgument) as raised:
        await ArithmeticTool().run({"expression": "2 +* 3"})
    assert raised.value.reason == "INVALID_EXPRESSION"
    assert [v.field for v in raised.value.violations] == ["args.expression"]


async def test_tool_maps_division_by_zero_to_arithmetic_error() -> None:
    with pytest.raises(ToolError) as raised:
        await ArithmeticTool().run({"expression": "1 / (2 - 2)"})
    assert raised.value.code == "ARITHMETIC_ERROR"
    assert not raised.value.retryable


async def test_tool_result_shape() -> None:
    assert await ArithmeticTool().run({"expression": "6 * 7"}) == {"result": 42}
