"""The one check of what draft-rag assumes of a transformers model, run before any compute.

:func:`check_supported` states every assumption in its docstring and checks it: the layer types and their
windows here, each attention layer's queries and keys through :mod:`draft_rag.hf.attention` (which reads the
layer's source with :mod:`draft_rag.hf.trace`). Scoring, SpecKV's eviction, sparse prefill and the draft cache
call it, so that an unsupported model is refused with a NotImplementedError, never scored wrongly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from draft_rag.checks import check_int
from draft_rag.hf.attention import attention_modules, key_rotation, model_name, query_rebuild

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Layer types (``config.layer_types``) whose attention the scoring reproduces, and the config field holding
# each one's window (None: the layer attends to every earlier key).
_WINDOW_FIELDS = {
    "full_attention": None,
    "sliding_attention": "sliding_window",
    "chunked_attention": "attention_chunk_size",
}


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
      :data:`~draft_rag.hf.attention.SHIFTABLE_ROPE`, and each layer rotates its keys last (no key norm after
      RoPE), so a cached key of a rotating layer moves by one more rotation and one of a layer without RoPE
      stays as it is.
    """
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

