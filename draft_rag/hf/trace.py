"""Reading an attention layer's ``forward`` from its source: how its query and key states are built and used.

:func:`attention_source` parses a class's ``forward`` (once per class) and follows the query and key states from
their projection (``self.q_proj(hidden_states)``) through every statement that assigns them, up to the one
attention call that receives them; :func:`active_steps` then evaluates the ``if`` tests around those
statements on one layer module (``if self.use_rope:``), so that each layer is judged by what it runs. What the
steps must look like is decided by :mod:`draft_rag.hf.attention`; this module only reads.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

_SPLIT = ("view", "reshape")  # tensor methods that split a projection into heads
LAYOUT = ("transpose", "contiguous")  # tensor methods that only move dimensions
# Arguments of the attention call that leave the causal softmax as the scoring computes it: the temperature
# (read per layer), dropout (off in inference), the sliding window (checked against the sequence length), the
# causal mask and the bookkeeping of padding-free batches.
_KNOWN_ARGUMENTS = ("scaling", "dropout", "sliding_window", "attention_mask", "position_ids", "output_attentions")


@dataclass(frozen=True)
class Step:
    """A statement of an attention ``forward`` that assigns the traced query (or key) states.

    ``kinds`` says what it does to them, in order: ``project``, ``split``, a layout change, ``norm``,
    ``rope``, ``cache`` (a key's ``cache.update``) or ``unknown``; ``conditions`` are the ``if`` tests it
    runs under.
    """

    kinds: tuple[str, ...]
    conditions: tuple[ast.expr, ...]
    source: str


@dataclass(frozen=True)
class AttentionSource:
    """What an attention class's ``forward`` does to its query and key states, read from its source."""

    owner: str
    query: tuple[Step, ...]
    key: tuple[Step, ...]
    rope: Callable[..., Any] | None
    scaling: ast.expr | None
    arguments: tuple[tuple[str, ast.expr], ...]  # further keyword arguments of the attention call


_SOURCES: dict[type, AttentionSource] = {}


class _Unknown(Exception):
    """An expression that cannot be evaluated before the model runs."""


def attention_source(cls: type) -> AttentionSource:
    """Follow the query and key states through ``cls.forward`` (once per class); NotImplementedError where that
    fails."""
    if cls not in _SOURCES:
        _SOURCES[cls] = _read_attention_source(cls)
    return _SOURCES[cls]


def _read_attention_source(cls: Any) -> AttentionSource:
    owner = cls.__name__
    forward: ast.stmt | None = None
    reason = "it is not a function definition"
    try:
        function = inspect.unwrap(cls.forward)
        forward = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    except (AttributeError, OSError, TypeError, SyntaxError) as error:
        reason = str(error)
    if not isinstance(forward, ast.FunctionDef):
        msg = (
            f"the source of {owner}.forward cannot be read ({reason}), so draft-rag cannot check how it builds "
            "its queries and applies RoPE; draft-rag needs a model class installed with its Python sources."
        )
        raise NotImplementedError(msg)
    parameters = [argument.arg for argument in forward.args.args]
    hidden = parameters[1] if len(parameters) > 1 else ""
    statements = list(_statements(forward.body, ()))
    query_name, query = _trace(statements, hidden, "q_proj", "q_norm")
    key_name, key = _trace(statements, hidden, "k_proj", "k_norm")
    problem = None
    if query_name is None or key_name is None:
        problem = "does not build its query and key as `query = self.q_proj(hidden_states)...`"
    elif not _angles_from_position_embeddings(statements, query_name):
        problem = "does not take its RoPE angles as `cos, sin = position_embeddings`"
    calls = [
        node
        for statement, _ in statements
        for node in ast.walk(statement)
        if isinstance(node, ast.Call) and [_name(a) for a in node.args[:3]] == ["self", query_name, key_name]
    ]
    if problem is None and len(calls) != 1:
        problem = "does not pass its query and key to one attention function as `(self, query, key, ...)`"
    if problem is not None:
        msg = f"{owner}.forward {problem}; draft-rag's scoring supports Llama/Qwen/Mistral-style attention layers."
        raise NotImplementedError(msg)
    (call,) = calls
    arguments = {keyword.arg: keyword.value for keyword in call.keywords if keyword.arg is not None}
    others = tuple((name, value) for name, value in arguments.items() if name not in _KNOWN_ARGUMENTS)
    rope = inspect.getclosurevars(function).globals.get("apply_rotary_pos_emb")
    return AttentionSource(owner, tuple(query), tuple(key), rope, arguments.get("scaling"), others)


def _statements(
    body: Sequence[ast.stmt], conditions: tuple[ast.expr, ...]
) -> Iterator[tuple[ast.stmt, tuple[ast.expr, ...]]]:
    """Every simple statement of ``body``, in order, with the ``if`` tests it runs under."""
    for statement in body:
        if isinstance(statement, ast.If):
            yield from _statements(statement.body, (*conditions, statement.test))
            yield from _statements(statement.orelse, (*conditions, ast.UnaryOp(ast.Not(), statement.test)))
        elif isinstance(statement, ast.With):
            yield from _statements(statement.body, conditions)
        else:
            yield statement, conditions


def _trace(
    statements: list[tuple[ast.stmt, tuple[ast.expr, ...]]], hidden: str, projection: str, norm: str
) -> tuple[str | None, list[Step]]:
    """The variable that ``self.<projection>(hidden)`` is assigned to, and every statement that assigns it."""
    name: str | None = None
    steps = []
    for statement, conditions in statements:
        if name is None:
            if not any(_is_call_of(node, projection) for node in ast.walk(statement)):
                continue
            if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1):
                return None, []
            name = _name(statement.targets[0])
            if name is None:
                return None, []
        elif not any(isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Store)
                     for node in ast.walk(statement)):
            continue
        kinds = _assignment(statement, name, hidden, projection, norm)
        steps.append(Step(kinds or ("unknown",), conditions, ast.unparse(statement)))
    return name, steps


def _assignment(statement: ast.stmt, name: str, hidden: str, projection: str, norm: str) -> tuple[str, ...] | None:
    """What ``statement`` does to the states in ``name``, or None when it is not a known step."""
    if not isinstance(statement, ast.Assign) or len(statement.targets) != 1:
        return None
    target, value = statement.targets[0], statement.value
    if isinstance(target, ast.Tuple) and isinstance(value, ast.Call):
        # ``query, key = apply_rotary_pos_emb(query, key, cos, sin)``; a key's ``cache.update`` ends its trace.
        targets = [_name(element) for element in target.elts]
        arguments = [_name(argument) for argument in value.args[:2]]
        if _name(value.func) == "apply_rotary_pos_emb" and name in targets[:2] and targets[:2] == arguments:
            return ("rope",)
        if isinstance(value.func, ast.Attribute) and value.func.attr == "update" and targets[0] == name:
            return ("cache",)
        return None
    if _name(target) != name:
        return None
    chain = _chain(value, name, hidden, projection, norm)
    return None if chain is None else tuple(chain)


def _chain(node: ast.expr, name: str, hidden: str, projection: str, norm: str) -> list[str] | None:
    """The steps of an expression built from the projection or from ``name`` itself, or None."""
    if _name(node) == name:
        return []
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return None
    owner, method = node.func.value, node.func.attr
    if _name(owner) == "self":
        if method == projection and [_name(argument) for argument in node.args] == [hidden] and not node.keywords:
            return ["project"]
        if method == norm and len(node.args) == 1 and not node.keywords:
            inner = _chain(node.args[0], name, hidden, projection, norm)
            return None if inner is None else [*inner, "norm"]
        return None
    if method in _SPLIT or method in LAYOUT:
        inner = _chain(owner, name, hidden, projection, norm)
        return None if inner is None else [*inner, "split" if method in _SPLIT else method]
    return None


def _angles_from_position_embeddings(statements: list[tuple[ast.stmt, tuple[ast.expr, ...]]], query: str) -> bool:
    """Whether every ``apply_rotary_pos_emb`` call on the query takes its cos and sin from ``position_embeddings``."""
    angles: list[str | None] = []
    for statement, _ in statements:
        if isinstance(statement, ast.Assign) and _name(statement.value) == "position_embeddings":
            target = statement.targets[0]
            if isinstance(target, ast.Tuple):
                angles = [_name(element) for element in target.elts]
    for statement, _ in statements:
        for node in ast.walk(statement):
            if isinstance(node, ast.Call) and _name(node.func) == "apply_rotary_pos_emb" and node.args:
                if _name(node.args[0]) == query and [_name(a) for a in node.args[2:4]] != angles:
                    return False
    return True


def active_steps(steps: Sequence[Step], module: Any, owner: str) -> list[Step]:
    """The steps that run in ``module``'s layer, up to a key's cache update: conditions evaluated on the module."""
    active = []
    for step in steps:
        if step.kinds == ("cache",):
            break  # whatever the condition around it (``if cache is not None``), later steps do not reach the cache
        if all(evaluate_or_refuse(test, module, owner, f"`{step.source}`") for test in step.conditions):
            active.append(step)
    return active


def evaluate_or_refuse(node: ast.expr, module: Any, owner: str, what: str) -> Any:
    """``node`` evaluated on ``module``; NotImplementedError, naming ``what`` it decides in ``owner``, where it
    cannot be evaluated before the model runs."""
    try:
        return _evaluate(node, module)
    except _Unknown as error:
        msg = (
            f"{owner} decides {what} with `{ast.unparse(node)}`, which draft-rag cannot evaluate before the model "
            f"runs ({error}); draft-rag's scoring supports Llama/Qwen/Mistral-style attention layers."
        )
        raise NotImplementedError(msg) from None


def _evaluate(node: ast.expr, module: Any) -> Any:
    """Evaluate an expression over ``self`` (the module) and constants only: attribute reads, ``not``,
    ``and``/``or``, one comparison and ``hasattr``. Anything else raises :class:`_Unknown`."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id == "self":
        return module
    if isinstance(node, ast.Attribute):
        owner = _evaluate(node.value, module)
        if not hasattr(owner, node.attr):
            raise _Unknown(f"no attribute {node.attr}")
        return getattr(owner, node.attr)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _evaluate(node.operand, module)
    if isinstance(node, ast.BoolOp):
        result = None
        for value in node.values:
            result = _evaluate(value, module)
            if bool(result) != isinstance(node.op, ast.And):
                break
        return result
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        left, right = _evaluate(node.left, module), _evaluate(node.comparators[0], module)
        comparisons: dict[type, Callable[[Any, Any], bool]] = {
            ast.Is: lambda a, b: a is b,
            ast.IsNot: lambda a, b: a is not b,
            ast.Eq: lambda a, b: a == b,
            ast.NotEq: lambda a, b: a != b,
            ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b,
        }
        if type(node.ops[0]) in comparisons:
            return comparisons[type(node.ops[0])](left, right)
    if isinstance(node, ast.Call) and _name(node.func) == "hasattr" and len(node.args) == 2:
        return hasattr(_evaluate(node.args[0], module), _evaluate(node.args[1], module))
    raise _Unknown(f"it reads more than the module's attributes: {ast.unparse(node)}")


def first_source(steps: Sequence[Step], kind: str) -> str:
    """The source line of the first step of ``steps`` that does ``kind``."""
    return next(step.source for step in steps if kind in step.kinds)


def _name(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else None


def _is_call_of(node: ast.AST, method: str) -> bool:
    """Whether ``node`` is a call ``self.<method>(...)``."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == method
        and _name(node.func.value) == "self"
    )
