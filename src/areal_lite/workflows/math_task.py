"""Rollout stage: the task the shipped workflows solve: prompts, a calculator, the reward.

Rows are `{"question": str, "answer": str}` (the generated arithmetic set, or GSM8K's
"... #### 42" answers). The calculator is the tool of the tool-using workflows: it
evaluates + - * / ** and parentheses on numbers, nothing else (no names, no calls).
"""

from __future__ import annotations

import ast
import operator

from areal_lite.data.rewards import math_reward

PROMPT = "{question}\nPut the final answer in \\boxed{{}}."
TOOL_PROMPT = ("{question}\nUse the calculator tool for arithmetic, then put the final "
               "answer in \\boxed{{}}.")
RETRY = "Your answer is wrong. Please check it and give the final answer in \\boxed{}."
CALCULATOR_DOC = "Evaluate an arithmetic expression such as '(3 + 4) * 2' and return the result."
CALCULATOR_PARAMS = {"type": "object", "required": ["expression"],
                     "properties": {"expression": {"type": "string",
                                                   "description": "the expression to evaluate"}}}
CALCULATOR_TOOL = {"type": "function", "function": {
    "name": "calculator", "description": CALCULATOR_DOC, "parameters": CALCULATOR_PARAMS}}

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow, ast.USub: operator.neg,
        ast.UAdd: operator.pos}


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError(f"unsupported expression element {type(node).__name__}")


def calculator(expression: str) -> str:
    """The calculator tool: the value of `expression`, or an error message (never raises)."""
    try:
        value = _eval(ast.parse(str(expression)[:200], mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
        return f"error: {e}"
    return str(int(value)) if float(value).is_integer() else str(value)


def reward(text: str, data: dict) -> float:
    """1.0 when the last \\boxed{} answer of `text` equals the row's answer, else 0.0."""
    return math_reward(text or "", str(data["answer"]))
