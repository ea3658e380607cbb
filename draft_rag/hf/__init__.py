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

Everything draft-rag knows of transformers' internals lives in this package, one concern a module:

- :mod:`draft_rag.hf.support`: :func:`check_supported`, the one check, and the layer types and windows.
- :mod:`draft_rag.hf.attention`: finding the attention layers, rebuilding their queries, rotating cached keys,
  registering an attention function.
- :mod:`draft_rag.hf.trace`: reading an attention layer's ``forward`` source (what the two above rely on).
- :mod:`draft_rag.hf.cache`: the KV cache: its forward keyword, building one from tensors, reading its layers.
"""

from __future__ import annotations

from draft_rag.hf.attention import (
    QueryRebuild,
    attention_modules,
    key_rotation,
    query_rebuild,
    rebuild_queries,
    register_attention,
    rotate_keys,
)
from draft_rag.hf.cache import (
    cache_bytes,
    cache_from_tensors,
    cache_kwargs,
    cache_layers,
    cache_tensors,
    empty_cache,
    hooked_cache,
    keep_layer_entries,
    kept_entries,
    kv_shape,
    layer_bytes,
    layer_keys,
)
from draft_rag.hf.support import check_supported

__all__ = [
    "QueryRebuild",
    "attention_modules",
    "cache_bytes",
    "cache_from_tensors",
    "cache_kwargs",
    "cache_layers",
    "cache_tensors",
    "check_supported",
    "empty_cache",
    "hooked_cache",
    "keep_layer_entries",
    "kept_entries",
    "key_rotation",
    "kv_shape",
    "layer_bytes",
    "layer_keys",
    "query_rebuild",
    "rebuild_queries",
    "register_attention",
    "rotate_keys",
]
