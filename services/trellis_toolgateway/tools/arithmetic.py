"""``arithmetic``: evaluate an arithmetic expression exactly, safely, without ``eval``.

The expression is parsed with ``ast`` and only numbers, ``+ - * / // % **``, unary
``+``/``-``, parentheses and a handful of functions are evaluated; anything else is
rejected before any work is done.

Numbers are exact rationals (``fractions.Fraction``): integers as written, decimals
(``0.1``, ``1.5e3``) by the decimal value of their text, never through a double, so
``2**53 + 1`` and ``0.1 + 0.2`` are exact. Only results with no exact rational value are
computed in floating point: ``sqrt`` of a non-square, a fractional power.

Exact numbers are unbounded in Python, so every step is bounded: the expression's
length, the exponent of ``**`` (and the digits a power would have, both checked *before*
computing it, so ``9**9**9**9`` fails in microseconds), and the digits of every
intermediate result's numerator and denominator (``MAX_DIGITS``).

The output is JSON carried in protobuf's Struct, where every number is a double:
``result`` is a JSON number when a double holds it exactly (integers up to 2**53 - 1 in
magnitude, decimals whose shortest double form is that decimal), otherwise a string of its
exact decimal digits (``"9007199254740993"``, ``"0.12345678901234567891"``, ``"1E-400"``)
that any big-number parser reads. A result with no finite decimal form (``1/3``) and the
floating-point ones are numbers, to double precision.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from decimal import Decimal, InvalidOperation, localcontext
from fractions import Fraction
from typing import Any

from trellis.runtime.errors import FieldViolation, InvalidArgument, quote
from trellis_toolgateway.tools.base import Json, Spec, Tool, ToolError

#: An exact value, or a floating-point one (sqrt of a non-square, fractional powers).
Number = Fraction | float

MAX_EXPRESSION_CHARS = 256
#: ``a ** b`` with ``abs(b)`` above this is refused whatever ``a`` is.
MAX_EXPONENT = 1000
#: No numerator or denominator of any intermediate or final result may have more digits.
MAX_DIGITS = 1000
MAX_ROUND_DIGITS = 15
#: Largest integer a double (a JSON number in most clients) holds exactly, with its neighbours.
MAX_SAFE_INTEGER = 2**53 - 1

#: Digits kept when a value is turned into a double, so the double is the nearest one.
_GUARD_DIGITS = 40

_LIMIT = 10**MAX_DIGITS
_LIMIT_BITS = _LIMIT.bit_length()


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


def _integer(value: Number, what: str) -> int:
    if isinstance(value, Fraction) and value.denominator == 1:
        return value.numerator
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ExpressionError(f"{what} must be an integer")


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return Fraction(round(x))
    digits = _integer(ndigits, "round() digits")
    if abs(digits) > MAX_ROUND_DIGITS:
        raise ExpressionError(
            f"round() digits must be an integer between -{MAX_ROUND_DIGITS} and {MAX_ROUND_DIGITS}"
        )
    return round(x, digits)


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise ArithmeticFailure("sqrt of a negative number")
    if isinstance(x, Fraction):
        top, bottom = math.isqrt(x.numerator), math.isqrt(x.denominator)
        if top * top == x.numerator and bottom * bottom == x.denominator:
            return Fraction(top, bottom)  # a square: exact
        with localcontext() as ctx:
            ctx.prec = _GUARD_DIGITS
            return float(_quotient(x).sqrt())
    return math.sqrt(x)


def _quotient(x: Fraction) -> Decimal:
    """``x`` as a Decimal, to the precision of the current context."""
    return Decimal(x.numerator) / Decimal(x.denominator)


def _min(*xs: Number) -> Number:
    return min(xs)


def _max(*xs: Number) -> Number:
    return max(xs)


def _abs(x: Number) -> Number:
    return abs(x)


#: name -> (function, fewest arguments, most arguments)
FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    "abs": (_abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (_min, 1, 64),
    "max": (_max, 1, 64),
    "sqrt": (_sqrt, 1, 1),
}


def _checked(value: Number) -> Number:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArithmeticFailure("result is not a finite number")
        return value
    if abs(value.numerator) >= _LIMIT or value.denominator >= _LIMIT:
        raise ArithmeticFailure(f"result has more than {MAX_DIGITS} digits")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise ArithmeticFailure(f"exponent exceeds {MAX_EXPONENT} in magnitude")
    if base == 0 and exponent < 0:
        raise ArithmeticFailure("zero to a negative power")
    if isinstance(base, Fraction) and isinstance(exponent, Fraction) and exponent.denominator == 1:
        power = exponent.numerator
        # Decide from the operands' sizes whether the result would be too long, before
        # computing it: bits(a ** n) <= n * bits(a).
        bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
        if bits > 1 and abs(power) * (bits - 1) > _LIMIT_BITS:
            raise ArithmeticFailure(f"result has more than {MAX_DIGITS} digits")
        return base**power
    if base < 0 and not float(exponent).is_integer():
        raise ArithmeticFailure("fractional power of a negative number")
    return float(base) ** float(exponent)


def _literal(node: ast.Constant, source: str) -> Fraction:
    """A number as written: ints as they are, decimals by the value of their text."""
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ExpressionError(f"only numbers are allowed, not {quote(value)}")
    if isinstance(value, int):
        return Fraction(value)
    text = (ast.get_source_segment(source, node) or repr(value)).replace("_", "")
    try:
        written = Decimal(text)
    except InvalidOperation as error:
        raise ExpressionError(f"not a number: {quote(text)}") from error
    exponent = written.as_tuple().exponent
    assert isinstance(exponent, int)  # finite: the parser gave a float literal
    if written and (written.adjusted() >= MAX_DIGITS or -exponent >= MAX_DIGITS):
        raise ArithmeticFailure(f"{text} has more than {MAX_DIGITS} digits")
    return Fraction(written)


def _eval(node: ast.AST, source: str) -> Number:
    if isinstance(node, ast.Expression):
        return _eval(node.body, source)
    if isinstance(node, ast.Constant):
        return _checked(_literal(node, source))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_eval(node.operand, source)))
    if isinstance(node, ast.BinOp):
        op = type(node.op)
        if op is ast.Pow:
            return _checked(_power(_eval(node.left, source), _eval(node.right, source)))
        if op in _BINARY:
            left, right = _eval(node.left, source), _eval(node.right, source)
            if op in (ast.Div, ast.FloorDiv, ast.Mod) and right == 0:
                raise ArithmeticFailure("division by zero")
            result = _BINARY[op](left, right)
            return _checked(Fraction(result) if isinstance(result, int) else result)
        raise ExpressionError(f"operator {op.__name__} is not allowed")
    if isinstance(node, ast.Call):
        return _call(node, source)
    if isinstance(node, ast.Name):
        raise ExpressionError(
            f"unknown name {quote(node.id)}; only numbers and functions are allowed"
        )
    raise ExpressionError(f"{type(node).__name__} is not allowed in an expression")


def _call(node: ast.Call, source: str) -> Number:
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        allowed = ", ".join(sorted(FUNCTIONS))
        raise ExpressionError(f"only these functions are allowed: {allowed}")
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise ExpressionError(f"{node.func.id}() takes positional numbers only")
    fn, fewest, most = FUNCTIONS[node.func.id]
    if not fewest <= len(node.args) <= most:
        raise ExpressionError(f"{node.func.id}() takes {fewest} to {most} arguments")
    args = [_eval(a, source) for a in node.args]
    try:
        result = fn(*args)
    except (OverflowError, ValueError) as error:
        if isinstance(error, ExpressionError):
            raise
        raise ArithmeticFailure(f"{node.func.id}(): {error}") from error
    return _checked(Fraction(result) if isinstance(result, int) else result)


def evaluate(expression: str) -> Number:
    """The value of ``expression``: a ``Fraction`` when exact, else a float.

    Raises ``ExpressionError`` for text that is not an allowed expression and
    ``ArithmeticFailure`` when evaluation fails (division by zero, a bound exceeded).
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    source = expression.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as error:
        raise ExpressionError(f"not a valid expression: {error.msg}") from error
    except ValueError as error:  # e.g. NUL bytes in the source
        raise ExpressionError(f"not a valid expression: {error}") from error
    try:
        return _eval(tree, source)
    except OverflowError as error:  # float ops beyond the double range
        raise ArithmeticFailure(str(error)) from error
    except RecursionError as error:
        raise ExpressionError("expression is nested too deeply") from error


def _decimal_digits(value: Fraction) -> Decimal | None:
    """The exact decimal form of ``value``, or None when it has none (1/3)."""
    rest, twos, fives = value.denominator, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return None
    places = max(twos, fives)
    scaled = value.numerator * (10**places // value.denominator)
    sign, digits, _ = Decimal(scaled).as_tuple()
    return Decimal((sign, digits, -places))


def to_json(value: Number) -> int | float | str:
    """``value`` as JSON that keeps it: a number when a double holds it exactly, else the
    string of its exact digits (see the module docstring)."""
    if isinstance(value, float):
        return value
    if value.denominator == 1:
        number = value.numerator
        return number if abs(number) <= MAX_SAFE_INTEGER else str(number)
    exact = _decimal_digits(value)
    if exact is None:  # no finite decimal form: the nearest double
        with localcontext() as ctx:
            ctx.prec = _GUARD_DIGITS
            close = _quotient(value)
            nearest = float(close)
            if math.isfinite(nearest) and nearest != 0:
                return nearest
            ctx.prec = 17  # beyond a double's range: its digits, as a string
            return str(+close)
    nearest = float(value)
    if math.isfinite(nearest) and Fraction(repr(nearest)) == value:
        return nearest
    return str(exact)


class ArithmeticTool(Tool):
    spec = Spec(
        name="arithmetic",
        description=(
            f"Evaluate an arithmetic expression exactly (integers of up to {MAX_DIGITS}"
            " digits, decimals): numbers, + - * / // % **, parentheses and abs, round, min,"
            ' max, sqrt. Example: {"expression": "(2 + 3) * sqrt(16)"} -> {"result": 20}.'
            " A result a JSON number cannot hold exactly is a string of its digits:"
            ' "2**53 + 1" -> {"result": "9007199254740993"}.'
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
            "properties": {
                "result": {
                    "type": ["number", "string"],
                    "description": "The value; a string of its exact decimal digits when a"
                    " JSON number (a double) cannot hold it exactly.",
                }
            },
            "required": ["result"],
            "additionalProperties": False,
        },
        #: 2: exact results (version 1 returned doubles); old cached results are not reused.
        version="2",
        cache_ttl=3600.0,
        timeout=1.0,
    )

    async def run(self, args: dict[str, Json]) -> Json:
        expression = args["expression"]
        try:
            return {"result": to_json(evaluate(expression))}
        except ExpressionError as error:
            raise InvalidArgument(
                f"invalid expression: {error}",
                reason="INVALID_EXPRESSION",
                violations=[FieldViolation("args.expression", str(error))],
                metadata={"tool": self.spec.name},
            ) from error
        except ArithmeticError as error:
            raise ToolError("ARITHMETIC_ERROR", str(error) or type(error).__name__) from error
