"""What draft-rag assumes of a transformers model, and the one check of it that runs before any compute.

The scoring (:mod:`draft_rag.scoring`) rebuilds each attention layer's queries from the layer's input and
reads its keys from the KV cache; the draft cache (:mod:`draft_rag.draft_cache`) moves cached keys to new
positions by rotating them once more; sparse prefill (:mod:`draft_rag.sparse_prefill`) replaces the
attention of long prefills and scores keys like the scoring does. All three depend on how a decoder's
attention layer is written, and architectures differ in ways a config does not show: SmolLM3 and EXAONE 4
skip RoPE in some layers, OLMo 2 normalizes the query before splitting it into heads, gpt-oss adds
attention sinks. So rather than trust a model class by its name, :func:`check_supported` reads the source
of each attention layer's ``forward`` and follows the query and key states from their projection to the
attention call. A layer that does anything draft-rag does not reproduce is refused with a
:class:`NotImplementedError` before any model runs, never scored wrongly.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

SHIFTABLE_ROPE = ("default", "linear", "llama3", "yarn")
"""RoPE types whose angle is a fixed frequency times the position, so that a shift is one more rotation
(``dynamic`` and ``longrope`` change their frequencies with the sequence length)."""

# Layer types (``config.layer_types``) whose attention the scoring reproduces, and the config field holding
# each one's window (None: the layer attends to every earlier key).
_WINDOW_FIELDS = {
    "full_attention": None,
    "sliding_attention": "sliding_window",
    "chunked_attention": "attention_chunk_size",
}
_SPLIT = ("view", "reshape")  # tensor methods that split a projection into heads
_LAYOUT = ("transpose", "contiguous")  # tensor methods that only move dimensions
# Arguments of the attention call that leave the causal softmax as the scoring computes it: the temperature
# (read per layer), dropout (off in inference), the sliding window (checked against the sequence length), the
# causal mask and the bookkeeping of padding-free batches.
_KNOWN_ARGUMENTS = ("scaling", "dropout", "sliding_window", "attention_mask", "position_ids", "output_attentions")


def check_supported(
    model: PreTrainedModel, total_tokens: int | None, *, scoring: bool = True, cache: bool = False
) -> None:
    """Raise NotImplementedError unless draft-rag can run ``model`` as asked; call it before any compute.

    Args:
        model: a decoder-only transformers model.
        total_tokens: the longest sequence the model will hold in one cache: the prompt plus every token fed
            after it (lookahead observers, generated tokens); None when it is not known yet (sparse prefill
            checks each forward call's windows itself).
        scoring: draft-rag reads the model's attention (observer scoring, SpecKV's eviction, sparse prefill),
            so every attention layer must be one whose queries and attention it reproduces.
        cache: the model's keys are also moved by a :class:`~draft_rag.DraftCache`.

    What is assumed, and checked here:

    - Always: every layer (``config.layer_types``, or the type transformers infers) is full, sliding-window
      or chunked attention, and every window holds ``total_tokens`` (such a window hides no key, so the layer
      attends exactly like full attention; a shorter one hides keys the scoring would count, and
      transformers' sliding caches drop them). No attention logit soft-capping (Gemma 2).
    - With ``scoring``: the attention layers are the modules with ``q_proj`` and ``layer_idx``, one per
      layer index (no cross-attention). Each one's
      ``forward`` (read from its source) builds the query as ``self.q_proj(hidden_states)`` split into heads
      (``view``/``reshape``), optionally ``self.q_norm`` over each head, then optionally
      ``apply_rotary_pos_emb(query, key, cos, sin)`` with ``cos, sin = position_embeddings``; nothing else
      changes it. A condition around these steps may read only the module's attributes (``if
      self.use_rope:`` in SmolLM3, ``if self.sliding_window is None or self.is_sliding:`` in EXAONE 4); it
      is evaluated per layer, so layers without RoPE are scored with unrotated queries. The query and key
      go to the attention function as ``(self, query, key, ...)``, with ``scaling`` (the softmax
      temperature), ``dropout``, ``sliding_window``, the mask, ``position_ids`` and ``**kwargs``; any other
      argument must be None there (``softcap`` off), since attention sinks (``s_aux``, gpt-oss) and the like
      are not reproduced.
    - With ``cache``: one rotary module (``rotary_emb``) serves every layer with a RoPE type of
      :data:`SHIFTABLE_ROPE`, and each layer rotates its keys last (no key norm after RoPE), so a cached
      key of a rotating layer moves by one more rotation and one of a layer without RoPE stays as it is.
    """
    from draft_rag.scoring import check_int  # here: draft_rag.scoring imports this module

    if total_tokens is not None:
        check_int("total_tokens", total_tokens, 0)
    config = model.config.get_text_config(decoder=True)
    name = model_name(model)
    if getattr(config, "attn_logit_softcapping", None):
        msg = (
            f"{name} soft-caps its attention logits (attn_logit_softcapping), which draft-rag's scoring does not "
            "reproduce; use a model without attention soft-capping."
        )
        raise NotImplementedError(msg)
    for layer_type in dict.fromkeys(_layer_types(config)):
        if layer_type not in _WINDOW_FIELDS:
            msg = (
                f"{name} has {layer_type!r} layers; draft-rag scores full, sliding-window and chunked attention "
                "layers only. Use a Llama/Qwen/Mistral-style decoder model."
            )
            raise NotImplementedError(msg)
        field_name = _WINDOW_FIELDS[layer_type]
        window = getattr(config, field_name) if field_name else None
        if window is not None and total_tokens is not None and total_tokens > window:
            msg = (
                f"{name} attends within a window of {window} tokens ({layer_type}), but this call needs "
                f"{total_tokens} tokens in one sequence (prompt plus lookahead and generated tokens); "
                f"draft-rag does not support attention limited to a window yet. Shorten the prompt or the "
                f"generation to at most {window} tokens in all, or use a model with full attention."
            )
            raise NotImplementedError(msg)
    if scoring or cache:
        for module in attention_modules(model):
            query_rebuild(module)
    if cache:
        key_rotation(model)


def model_name(model: PreTrainedModel) -> str:
    """The model's checkpoint name, or its class name, for messages."""
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def attention_modules(model: PreTrainedModel) -> Iterator[torch.nn.Module]:
    """The self-attention module of each decoder layer, in layer order."""
    found = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if not found:
        msg = (
            f"{type(model).__name__} has no attention layers with q_proj/layer_idx; draft-rag supports "
            "Llama/Qwen/Mistral-style decoder models."
        )
        raise NotImplementedError(msg)
    indices = [m.layer_idx for m in found]
    if not all(isinstance(index, int) for index in indices) or len(set(indices)) != len(indices):
        msg = (
            f"{type(model).__name__} has attention modules without a layer index of their own (cross-attention, "
            "shared layers); draft-rag supports decoder-only Llama/Qwen/Mistral-style models."
        )
        raise NotImplementedError(msg)
    yield from sorted(found, key=lambda m: m.layer_idx)


@dataclass(frozen=True)
class QueryRebuild:
    """How one attention layer turns its input into the query states it attends with.

    Attributes:
        head_dim: dimensions per head.
        norm: the layer applies its ``q_norm`` to each head's query (after the split, before RoPE).
        rope: the layer's ``apply_rotary_pos_emb``, or None for a layer that does not rotate its queries and
            keys (SmolLM3's every fourth layer).
        scaling: the softmax temperature the layer passes to its attention function.
    """

    head_dim: int
    norm: bool
    rope: Callable[..., Any] | None
    scaling: float


def query_rebuild(module: Any) -> QueryRebuild:
    """How ``module`` (an attention layer) builds its queries; NotImplementedError if draft-rag cannot rebuild them.

    See :func:`check_supported` for what is required.
    """
    source = _attention_source(type(module))
    query = _active(source.query, module, source.owner)
    for argument, value in source.arguments:
        # Evaluated per layer: an argument that is None there (Gemma 2's softcap when switched off) is harmless.
        if _evaluate_or_refuse(value, module, source.owner, f"its attention argument {argument}") is not None:
            msg = (
                f"{source.owner} passes {argument}={ast.unparse(value)} to its attention function, which "
                "draft-rag's scoring does not reproduce; use a Llama/Qwen/Mistral-style model."
            )
            raise NotImplementedError(msg)
    kinds = [kind for step in query for kind in step.kinds if kind not in _LAYOUT]
    order = [kind for kind in kinds if kind != "split"]
    problem = None
    if "unknown" in kinds:
        problem = f"changes its query in a way draft-rag does not rebuild (`{_first(query, 'unknown')}`)"
    elif kinds[:2] != ["project", "split"] or kinds.count("split") != 1:
        problem = "does not split its q_proj output into heads right after the projection"
    elif order not in (["project"], ["project", "norm"], ["project", "rope"], ["project", "norm", "rope"]):
        problem = f"applies its query norm and RoPE in an order draft-rag does not rebuild ({', '.join(order)})"
    if problem is not None:
        msg = f"{source.owner} {problem}; draft-rag's scoring supports Llama/Qwen/Mistral-style attention layers."
        raise NotImplementedError(msg)
    head_dim = getattr(module, "head_dim", None)
    if head_dim is None:
        config = module.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    scaling = int(head_dim) ** -0.5
    if source.scaling is not None:
        scaling = _evaluate_or_refuse(source.scaling, module, source.owner, "its softmax temperature")
    return QueryRebuild(int(head_dim), "norm" in kinds, source.rope if "rope" in kinds else None, float(scaling))


def key_rotation(model: PreTrainedModel) -> tuple[Any, Callable[..., Any] | None, list[bool]]:
    """What moving ``model``'s cached keys to new positions needs: its rotary module, its
    ``apply_rotary_pos_emb`` and, per layer, whether the layer's keys are rotated (False: RoPE-less layer).

    Raises:
        NotImplementedError: a shift of position is not one more rotation of the cached keys (see
            :func:`check_supported`, ``cache``).
    """
    rotated, functions = [], set()
    modules: list[Any] = list(attention_modules(model))
    for module in modules:
        rope = query_rebuild(module).rope
        rotated.append(rope is not None)
        if rope is not None:
            functions.add(rope)
            source = _attention_source(type(module))
            key = [kind for step in _active(source.key, module, source.owner) for kind in step.kinds]
            after = key[key.index("rope") + 1 :] if "rope" in key else ["unknown"]
            if any(kind not in ("split", *_LAYOUT) for kind in after):
                msg = (
                    f"{source.owner} does not rotate its keys last, so a draft cache cannot move them to new "
                    "positions; use SpecPC without cache= for this draft model."
                )
                raise NotImplementedError(msg)
    rotary = next((m for n, m in model.named_modules() if n.split(".")[-1] == "rotary_emb"), None)
    rope_type = getattr(rotary, "rope_type", None)
    # Without a rotary module the positions come from elsewhere (learned absolute embeddings) and cannot move.
    if rotary is None or len(functions) > 1 or rope_type not in SHIFTABLE_ROPE:
        msg = (
            f"{model_name(model)} uses RoPE of type {rope_type!r}, which a draft cache cannot shift to new "
            f"positions (supported: {', '.join(SHIFTABLE_ROPE)}); use SpecPC without cache= for this draft model."
        )
        raise NotImplementedError(msg)
    return rotary, next(iter(functions), None), rotated


def _layer_types(config: Any) -> list[str]:
    """Each layer's attention type, inferred like transformers does when the config lists none."""
    declared = getattr(config, "layer_types", None)
    if declared is not None:
        return list(declared)
    if getattr(config, "sliding_window", None) is not None:
        inferred = "sliding_attention"
    elif getattr(config, "attention_chunk_size", None) is not None:
        inferred = "chunked_attention"
    else:
        inferred = "full_attention"
    return [inferred] * config.num_hidden_layers


@dataclass(frozen=True)
class _Step:
    """A statement of an attention ``forward`` that assigns the traced query (or key) states.

    ``kinds`` says what it does to them, in order: ``project``, ``split``, a layout change, ``norm``,
    ``rope``, ``cache`` (a key's ``cache.update``) or ``unknown``; ``conditions`` are the ``if`` tests it
    runs under.
    """

    kinds: tuple[str, ...]
    conditions: tuple[ast.expr, ...]
    source: str


@dataclass(frozen=True)
class _AttentionSource:
    """What an attention class's ``forward`` does to its query and key states, read from its source."""

    owner: str
    query: tuple[_Step, ...]
    key: tuple[_Step, ...]
    rope: Callable[..., Any] | None
    scaling: ast.expr | None
    arguments: tuple[tuple[str, ast.expr], ...]  # further keyword arguments of the attention call


_SOURCES: dict[type, _AttentionSource] = {}


class _Unknown(Exception):
    """An expression that cannot be evaluated before the model runs."""


def _attention_source(cls: type) -> _AttentionSource:
    """Follow the query and key states through ``cls.forward`` (once per class); NotImplementedError where that
    fails."""
    if cls not in _SOURCES:
        _SOURCES[cls] = _read_attention_source(cls)
    return _SOURCES[cls]


def _read_attention_source(cls: Any) -> _AttentionSource:
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
    return _AttentionSource(owner, tuple(query), tuple(key), rope, arguments.get("scaling"), others)


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
) -> tuple[str | None, list[_Step]]:
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
        steps.append(_Step(kinds or ("unknown",), conditions, ast.unparse(statement)))
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
    if method in _SPLIT or method in _LAYOUT:
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


def _active(steps: Sequence[_Step], module: Any, owner: str) -> list[_Step]:
    """The steps that run in ``module``'s layer, up to a key's cache update: conditions evaluated on the module."""
    active = []
    for step in steps:
        if step.kinds == ("cache",):
            break  # whatever the condition around it (``if cache is not None``), later steps do not reach the cache
        if all(_evaluate_or_refuse(test, module, owner, f"`{step.source}`") for test in step.conditions):
            active.append(step)
    return active


def _evaluate_or_refuse(node: ast.expr, module: Any, owner: str, what: str) -> Any:
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


def _first(steps: Sequence[_Step], kind: str) -> str:
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
