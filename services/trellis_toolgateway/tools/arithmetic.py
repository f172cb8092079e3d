"""``arithmetic``: evaluate an arithmetic expression safely, without ``eval``.

The expression is parsed with ``ast`` and only numbers, ``+ - * / // % **``, unary
``+``/``-``, parentheses and a handful of functions are evaluated; anything else is
rejected before any work is done. Python's own integers are unbounded, so every step
is bounded too: the expression's length, the exponent of ``**`` (checked *before*
computing it, so ``9**9**9**9`` fails in microseconds) and the magnitude of every
intermediate result.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from trellis.runtime.errors import FieldViolation, InvalidArgument, quote
from trellis_toolgateway.tools.base import Json, Spec, Tool, ToolError

Number = int | float

MAX_EXPRESSION_CHARS = 256
#: ``a ** b`` with ``abs(b)`` above this is refused whatever ``a`` is.
MAX_EXPONENT = 1000
#: Any intermediate or final result beyond this magnitude is an overflow.
MAX_MAGNITUDE = 1e100
MAX_ROUND_DIGITS = 15


class ExpressionError(ValueError):
    """The text is not an expression this evaluator accepts (syntax or disallowed part)."""


class ArithmeticFailure(ArithmeticError):
    """A valid expression whose evaluation fails: division by zero, overflow, domain."""


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or abs(ndigits) > MAX_ROUND_DIGITS:
        raise ExpressionError(
            f"round() digits must be an integer between -{MAX_ROUND_DIGITS} and {MAX_ROUND_DIGITS}"
        )
    return round(x, ndigits)


def _sqrt(x: Number) -> float:
    if x < 0:
        raise ArithmeticFailure("sqrt of a negative number")
    return math.sqrt(x)


def _min(*xs: Number) -> Number:
    return min(xs)


def _max(*xs: Number) -> Number:
    return max(xs)


#: name -> (function, fewest arguments, most arguments)
FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (_min, 1, 64),
    "max": (_max, 1, 64),
    "sqrt": (_sqrt, 1, 1),
}


def _checked(value: Number) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise ArithmeticFailure("result is not a finite number")
    if abs(value) > MAX_MAGNITUDE:
        raise ArithmeticFailure(f"result exceeds {MAX_MAGNITUDE:g} in magnitude")
    return value


def _power(base: Number, exponent: Number) -> Number:
    # Decide from logarithms whether the result would be too large before computing it.
    if abs(exponent) > MAX_EXPONENT:
        raise ArithmeticFailure(f"exponent exceeds {MAX_EXPONENT} in magnitude")
    if base == 0 and exponent < 0:
        raise ArithmeticFailure("zero to a negative power")
    if base != 0 and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise ArithmeticFailure(f"result exceeds {MAX_MAGNITUDE:g} in magnitude")
    if base < 0 and not float(exponent).is_integer():
        raise ArithmeticFailure("fractional power of a negative number")
    return base**exponent


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ExpressionError(f"only numbers are allowed, not {quote(value)}")
        return _checked(value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp):
        op = type(node.op)
        if op is ast.Pow:
            return _checked(_power(_eval(node.left), _eval(node.right)))
        if op in _BINARY:
            left, right = _eval(node.left), _eval(node.right)
            if op in (ast.Div, ast.FloorDiv, ast.Mod) and right == 0:
                raise ArithmeticFailure("division by zero")
            return _checked(_BINARY[op](left, right))
        raise ExpressionError(f"operator {op.__name__} is not allowed")
    if isinstance(node, ast.Call):
        return _call(node)
    if isinstance(node, ast.Name):
        raise ExpressionError(
            f"unknown name {quote(node.id)}; only numbers and functions are allowed"
        )
    raise ExpressionError(f"{type(node).__name__} is not allowed in an expression")


def _call(node: ast.Call) -> Number:
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        allowed = ", ".join(sorted(FUNCTIONS))
        raise ExpressionError(f"only these functions are allowed: {allowed}")
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise ExpressionError(f"{node.func.id}() takes positional numbers only")
    fn, fewest, most = FUNCTIONS[node.func.id]
    if not fewest <= len(node.args) <= most:
        raise ExpressionError(f"{node.func.id}() takes {fewest} to {most} arguments")
    args = [_eval(a) for a in node.args]
    try:
        return _checked(fn(*args))
    except (OverflowError, ValueError) as error:
        if isinstance(error, ExpressionError):
            raise
        raise ArithmeticFailure(f"{node.func.id}(): {error}") from error


def evaluate(expression: str) -> Number:
    """The value of ``expression``.

    Raises ``ExpressionError`` for text that is not an allowed expression and
    ``ArithmeticFailure`` when evaluation fails (division by zero, a bound exceeded).
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise ExpressionError(f"not a valid expression: {error.msg}") from error
    except ValueError as error:  # e.g. NUL bytes in the source
        raise ExpressionError(f"not a valid expression: {error}") from error
    try:
        return _eval(tree)
    except OverflowError as error:  # float ops beyond the double range
        raise ArithmeticFailure(str(error)) from error
    except RecursionError as error:
        raise ExpressionError("expression is nested too deeply") from error


class ArithmeticTool(Tool):
    spec = Spec(
        name="arithmetic",
        description=(
            "Evaluate an arithmetic expression exactly: numbers, + - * / // % **, "
            'parentheses and abs, round, min, max, sqrt. Example: {"expression": '
            '"(2 + 3) * sqrt(16)"} -> {"result": 20.0}.'
        ),
        input_schema={
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_EXPRESSION_CHARS,
                    "description": 'An arithmetic expression, e.g. "2 ** 10 / 4".',
                }
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"result": {"type": "number"}},
            "required": ["result"],
            "additionalProperties": False,
        },
        cache_ttl=3600.0,
        timeout=1.0,
    )

    async def run(self, args: dict[str, Json]) -> Json:
        expression = args["expression"]
        try:
            return {"result": evaluate(expression)}
        except ExpressionError as error:
            raise InvalidArgument(
                f"invalid expression: {error}",
                reason="INVALID_EXPRESSION",
                violations=[FieldViolation("args.expression", str(error))],
                metadata={"tool": self.spec.name},
            ) from error
        except ArithmeticError as error:
            raise ToolError("ARITHMETIC_ERROR", str(error) or type(error).__name__) from error
