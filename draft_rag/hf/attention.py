"""The attention layers of a transformers model: finding them, rebuilding their queries, moving their keys.

The scoring rebuilds each layer's query states from the layer's input (:func:`query_rebuild` says how a layer
builds them, :func:`rebuild_queries` does it); the draft cache moves cached keys to new positions by one more
rotation (:func:`key_rotation`, :func:`rotate_keys`); sparse prefill registers an attention function of its
own (:func:`register_attention`). What each of these requires of a layer is read from the layer's source by
:mod:`draft_rag.hf.trace` and refused with a NotImplementedError where draft-rag would not reproduce it.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from draft_rag.hf.trace import LAYOUT, active_steps, attention_source, evaluate_or_refuse, first_source

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SHIFTABLE_ROPE = ("default", "linear", "llama3", "yarn")
"""RoPE types whose angle is a fixed frequency times the position, so that a shift is one more rotation
(``dynamic`` and ``longrope`` change their frequencies with the sequence length)."""


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


def config_head_dim(config: Any) -> int:
    """Dimensions per attention head, as a config states them (``head_dim``) or implies them."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


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

    See :func:`~draft_rag.hf.support.check_supported` for what is required.
    """
    source = attention_source(type(module))
    query = active_steps(source.query, module, source.owner)
    for argument, value in source.arguments:
        # Evaluated per layer: an argument that is None there (Gemma 2's softcap when switched off) is harmless.
        if evaluate_or_refuse(value, module, source.owner, f"its attention argument {argument}") is not None:
            msg = (
                f"{source.owner} passes {argument}={ast.unparse(value)} to its attention function, which "
                "draft-rag's scoring does not reproduce; use a Llama/Qwen/Mistral-style model."
            )
            raise NotImplementedError(msg)
    kinds = [kind for step in query for kind in step.kinds if kind not in LAYOUT]
    order = [kind for kind in kinds if kind != "split"]
    problem = None
    if "unknown" in kinds:
        problem = f"changes its query in a way draft-rag does not rebuild (`{first_source(query, 'unknown')}`)"
    elif kinds[:2] != ["project", "split"] or kinds.count("split") != 1:
        problem = "does not split its q_proj output into heads right after the projection"
    elif order not in (["project"], ["project", "norm"], ["project", "rope"], ["project", "norm", "rope"]):
        problem = f"applies its query norm and RoPE in an order draft-rag does not rebuild ({', '.join(order)})"
    if problem is not None:
        msg = f"{source.owner} {problem}; draft-rag's scoring supports Llama/Qwen/Mistral-style attention layers."
        raise NotImplementedError(msg)
    head_dim = getattr(module, "head_dim", None)
    if head_dim is None:
        head_dim = config_head_dim(module.config)
    scaling = int(head_dim) ** -0.5
    if source.scaling is not None:
        scaling = evaluate_or_refuse(source.scaling, module, source.owner, "its softmax temperature")
    return QueryRebuild(int(head_dim), "norm" in kinds, source.rope if "rope" in kinds else None, float(scaling))


def rebuild_queries(
    module: Any,
    rebuild: QueryRebuild,
    hidden: torch.Tensor,
    angles: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Rebuild an attention layer's query states ``[batch, heads, q, dim]`` (post-RoPE where the layer rotates)
    from its input, as :func:`query_rebuild` found the layer builds them; ``angles`` are the layer's ``(cos,
    sin)`` for these positions, None for a layer without RoPE."""
    query = module.q_proj(hidden).view(*hidden.shape[:-1], -1, rebuild.head_dim)
    if rebuild.norm:
        query = module.q_norm(query)
    query = query.transpose(1, 2)
    if rebuild.rope is None or angles is None:
        return query
    rotated, _ = rebuild.rope(query, query, *angles)
    return rotated


def key_rotation(model: PreTrainedModel) -> tuple[Any, Callable[..., Any] | None, list[bool]]:
    """What moving ``model``'s cached keys to new positions needs: its rotary module, its
    ``apply_rotary_pos_emb`` and, per layer, whether the layer's keys are rotated (False: RoPE-less layer).

    Raises:
        NotImplementedError: a shift of position is not one more rotation of the cached keys (see
            :func:`~draft_rag.hf.support.check_supported`, ``cache``).
    """
    rotated, functions = [], set()
    modules: list[Any] = list(attention_modules(model))
    for module in modules:
        rope = query_rebuild(module).rope
        rotated.append(rope is not None)
        if rope is not None:
            functions.add(rope)
            source = attention_source(type(module))
            key = [kind for step in active_steps(source.key, module, source.owner) for kind in step.kinds]
            after = key[key.index("rope") + 1 :] if "rope" in key else ["unknown"]
            if any(kind not in ("split", *LAYOUT) for kind in after):
                msg = (
                    f"{source.owner} does not rotate its keys last, so a draft cache cannot move them to new "
                    "positions; use SpecPC(reading='joint') without cache= for this draft model."
                )
                raise NotImplementedError(msg)
    rotary = next((m for n, m in model.named_modules() if n.split(".")[-1] == "rotary_emb"), None)
    rope_type = getattr(rotary, "rope_type", None)
    # Without a rotary module the positions come from elsewhere (learned absolute embeddings) and cannot move.
    if rotary is None or len(functions) > 1 or rope_type not in SHIFTABLE_ROPE:
        msg = (
            f"{model_name(model)} uses RoPE of type {rope_type!r}, which a draft cache cannot shift to new "
            f"positions (supported: {', '.join(SHIFTABLE_ROPE)}); use SpecPC(reading='joint') without cache= for this "
            "draft model."
        )
        raise NotImplementedError(msg)
    return rotary, next(iter(functions), None), rotated


def rotate_keys(model: PreTrainedModel, keys: torch.Tensor, shift: int | torch.Tensor) -> torch.Tensor:
    """Every layer's post-RoPE ``keys`` ``[layers, kv_heads, tokens, head_dim]`` moved ``shift`` positions later
    (or earlier): one shift for all, or a ``[tokens]`` tensor of each key's own shift on the keys' device.

    RoPE rotates each pair of dimensions by an angle proportional to the position, so a key of position ``p``
    becomes the key of position ``p + shift`` by one more rotation by ``shift``. The rotation uses the
    model's own rotary module and ``apply_rotary_pos_emb`` (so partial and interleaved RoPE work), with the
    rotary module's ``attention_scaling`` divided out so that it is a pure rotation. The angles' cosines and
    sines are computed in fp32 and rounded once to the keys' dtype; the rotation runs on the keys' device in
    their dtype (the model's, as its own layers apply RoPE), so no fp32 copy of the keys is made. Nothing is
    read back to the host. The keys of a layer without RoPE (SmolLM3's every fourth layer) hold no position
    and stay as they are.

    Raises:
        NotImplementedError: a shift is not one more rotation of the keys, e.g. the model's RoPE changes its
            frequencies with the sequence length (``dynamic``, ``longrope``) or differs between layers (see
            :func:`~draft_rag.hf.support.check_supported`).
    """
    rotary, apply_rope, rotated = key_rotation(model)
    if keys.shape[0] != len(rotated):
        msg = f"rotate_keys needs the keys of all {len(rotated)} layers of the model, got {keys.shape[0]}."
        raise ValueError(msg)
    layers = [index for index, rotates in enumerate(rotated) if rotates]
    if (isinstance(shift, int) and shift == 0) or not layers:
        return keys
    assert apply_rope is not None  # key_rotation found it where a layer rotates
    # Positions filled on the device: torch.tensor([[shift]], device=...) would copy from the host and wait.
    positions = torch.full((1, 1), shift, device=keys.device) if isinstance(shift, int) else shift.view(1, -1)
    probe = torch.zeros(1, device=keys.device)  # fp32, so that the rotary module returns fp32 angles
    cos, sin = rotary(probe, positions)
    scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    cos, sin = (cos / scaling).to(keys.dtype), (sin / scaling).to(keys.dtype)
    every = len(layers) == len(rotated)
    turning = keys if every else keys[layers]
    # apply_rotary_pos_emb turns a query too: a one-head slice of the keys costs next to nothing.
    _, turned = apply_rope(turning[:1, :1], turning, cos, sin)
    if every:
        return turned
    moved = keys.clone()
    moved[layers] = turned
    return moved


def register_attention(name: str, like: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Register ``wrap(f)`` as the attention function ``name``, where ``f`` is the one registered as ``like``
    (``"sdpa"``...), and give ``name`` the attention mask that ``like`` gets; a layer whose config names
    ``name`` in ``_attn_implementation`` then calls it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(name, wrap(ALL_ATTENTION_FUNCTIONS[like]))
    # A wrapper that falls back to ``like`` (sparse prefill's dense path) must see the very mask ``like`` would
    # build (cache offsets, padding).
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[like])
