"""The assistant's calculator tool: arithmetic only, evaluated by walking the syntax tree.

The model writes an expression between <|python_start|> and <|python_end|>; the engine puts the
result between <|output_start|> and <|output_end|>. Nothing is ever passed to `eval`: the
expression is parsed with `ast` and only numbers, + - * / // % **, unary signs, parentheses and
one string method, `'word'.count('letter')` (for spelling questions), are evaluated. Anything else
(names, attribute access, calls, comprehensions, huge powers) is refused with None.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e18  # results past this are refused: they only appear in runaway expressions

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class Refused(ValueError):
    """The expression is not plain arithmetic (or would be too expensive to evaluate)."""


def _number(node: ast.AST) -> int | float:
    value = _evaluate(node)
    if isinstance(value, str):
        raise Refused("strings only appear in 'text'.count('x')")
    return value


def _count(node: ast.Call) -> int:
    func = node.func
    ok = (
        isinstance(func, ast.Attribute) and func.attr == "count"
        and isinstance(func.value, ast.Constant) and isinstance(func.value.value, str)
        and len(node.args) == 1 and not node.keywords
        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
    )
    if not ok:
        raise Refused("the only call allowed is 'text'.count('x')")
    return func.value.value.count(node.args[0].value)


def _evaluate(node: ast.AST) -> int | float | str:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):  # bool is refused
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_number(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _number(node.left), _number(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > MAX_MAGNITUDE):
            raise Refused("power too large")
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE:
            raise Refused("result out of range")
        return result
    if isinstance(node, ast.Call):
        return _count(node)
    raise Refused(f"{type(node).__name__} is not arithmetic")


def _format(value: int | float) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Refused("not a finite number")
        if value.is_integer():
            return str(int(value))
        return f"{value:.6g}"
    return str(value)


def calculate(expression: str) -> str | None:
    """The value of an arithmetic expression as text, or None if it is refused or fails."""
    expression = expression.strip()
    if not expression or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    if "'" not in expression and '"' not in expression:
        expression = expression.replace(",", "")  # "1,234 * 2": thousands separators, not tuples
    try:
        tree = ast.parse(expression, mode="eval")
        value = _evaluate(tree.body)
        return value if isinstance(value, str) else _format(value)
    except (Refused, SyntaxError, ZeroDivisionError, OverflowError, ValueError, TypeError):
        return None
