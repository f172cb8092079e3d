"""The arithmetic evaluator: values and precedence, exactness, rejected syntax, failures,
DoS bounds, and the JSON form of results."""

import json
from fractions import Fraction

import pytest

from trellis.runtime.convert import from_value, to_value
from trellis.runtime.errors import InvalidArgument
from trellis_toolgateway.tools.arithmetic import (
    MAX_DIGITS,
    MAX_EXPONENT,
    MAX_EXPRESSION_CHARS,
    ArithmeticFailure,
    ArithmeticTool,
    ExpressionError,
    evaluate,
    to_json,
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
        ("7 / 2", Fraction(7, 2)),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("10 - 4 - 3", 3),  # left-associative
        ("+5", 5),
        ("2 ** -1", Fraction(1, 2)),
        ("1.5e3 + 0.25", Fraction(600100, 400)),
        ("sqrt(16) + abs(-2)", 6),
        ("round(2.567, 2)", Fraction(257, 100)),
        ("round(2.5)", 2),
        ("min(3, 1, 2) + max(4, 5)", 6),
        ("  ( 1 +\t1 )  ", 2),
        ("10 ** 100", 10**100),
        ("sqrt(2)", 2**0.5),  # no exact value: floating point
        ("4 ** 0.5", 2.0),
    ],
)
def test_values_and_precedence(expression: str, expected: Fraction | float) -> None:
    assert evaluate(expression) == expected


@pytest.mark.parametrize(
    ("expression", "exact"),
    [
        ("2**53 + 1", 2**53 + 1),
        ("123456789123456789 * 987654321987654321", 123456789123456789 * 987654321987654321),
        ("0.1 + 0.2", Fraction(3, 10)),  # decimals by their written value, not as doubles
        ("1e308 * 10", 10**309),
        ("1_000.5 * 2", 2001),
        ("1 / 3 * 3", 1),
        ("sqrt(0.25)", Fraction(1, 2)),  # a square: exact
        ("round(1 / 3, 5)", Fraction(33333, 100000)),
        ("(10 ** 30 + 1) - 10 ** 30", 1),
    ],
)
def test_integers_of_any_size_and_decimals_are_exact(expression: str, exact: Fraction) -> None:
    assert evaluate(expression) == exact


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


@pytest.mark.timeout(10)  # a missing bound hangs or eats memory instead of failing
@pytest.mark.parametrize(
    "expression",
    [
        "9**9**9**9",
        "2 ** 10000",
        f"10 ** {MAX_DIGITS}",
        "(10 ** 600) * (10 ** 600)",
        "99999999999 ** 999",
        "-(10 ** 999) * 100",
        "(1 / 3) ** 999 * (1 / 7) ** 999",  # the denominator's digits count too
        "1e999999999",
        "1e-999999999",
        "10.0 ** 400 * 10.0 ** 400 * 10.0 ** 400",
        "2.0 ** 0.5 * 1e308 ** 1.5",
    ],
)
def test_huge_results_fail_instead_of_hanging(expression: str) -> None:
    with pytest.raises(ArithmeticFailure):
        evaluate(expression)


def test_digits_bound_is_inclusive_of_the_largest_allowed_value() -> None:
    assert evaluate(f"10 ** {MAX_DIGITS - 1}") == 10 ** (MAX_DIGITS - 1)
    assert evaluate(f"1 / 10 ** {MAX_DIGITS - 1}") == Fraction(1, 10 ** (MAX_DIGITS - 1))


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


@pytest.mark.parametrize(
    ("expression", "result"),
    [
        ("6 * 7", 42),
        ("2**53 - 1", 2**53 - 1),  # the largest integer every JSON client reads exactly
        ("-(2**53 - 1)", -(2**53 - 1)),
        ("2**53", "9007199254740992"),
        ("2**53 + 1", "9007199254740993"),
        ("-(2**53 + 1)", "-9007199254740993"),
        ("123456789123456789 * 987654321987654321", "121932631356500531347203169112635269"),
        ("0.1 + 0.2", 0.3),  # a double's shortest form is the exact decimal
        ("7 / 2", 3.5),
        ("0.12345678901234567891", "0.12345678901234567891"),  # more digits than a double
        ("1e-400", "1E-400"),
        ("1 / 3", 1 / 3),  # no finite decimal form: the nearest double
        ("10 ** 400 / 3", "3.3333333333333333E+399"),
        ("sqrt(2)", 2**0.5),
    ],
)
async def test_results_are_json_that_keeps_their_value(
    expression: str, result: int | float | str
) -> None:
    output = await ArithmeticTool().run({"expression": expression})
    assert output == {"result": result}
    assert type(output["result"]) is type(result)
    # Through the wire (protobuf Struct: every number a double) and back, still exact.
    assert from_value(to_value(output)) == output
    assert json.loads(json.dumps(output)) == output
    if isinstance(result, str) and expression != "10 ** 400 / 3":  # that one has no decimal form
        assert Fraction(result) == evaluate(expression)


def test_to_json_keeps_exact_values_exact() -> None:
    assert to_json(Fraction(2**53 + 1)) == "9007199254740993"
    assert to_json(Fraction(1, 4)) == 0.25
    assert to_json(0.1) == 0.1


async def test_output_matches_the_declared_contract() -> None:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(ArithmeticTool.spec.output_schema)
    for expression in ("6 * 7", "2**53 + 1", "1 / 3"):
        validator.validate(await ArithmeticTool().run({"expression": expression}))
