"""The KV cache of a transformers model: the keyword a forward call takes it by, building one, reading its layers.

transformers 5 keeps a cache's tensors in ``cache.layers``, one object per layer whose ``keys`` and ``values``
are ``[batch, kv_heads, tokens, head_dim]`` (None until the layer is filled) and may be replaced. The helpers
here build caches from tensors and read, measure and shrink their layers, so that this layout is known in one
place.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from draft_rag.hf.attention import config_head_dim

if TYPE_CHECKING:
    from transformers import Cache, DynamicCache, PreTrainedModel


def cache_kwargs(model: PreTrainedModel, cache: Cache) -> dict[str, Cache]:
    """``{keyword: cache}`` for a forward call of ``model``: transformers 5.25 renamed ``past_key_values`` to
    ``cache`` (the old keyword still works there, with a warning, until 5.40); older 5.x know only the old one."""
    model_class = type(model)
    if model_class not in _CACHE_KEYWORDS:
        parameters = inspect.signature(model_class.forward).parameters
        _CACHE_KEYWORDS[model_class] = "cache" if "cache" in parameters else "past_key_values"
    return {_CACHE_KEYWORDS[model_class]: cache}


_CACHE_KEYWORDS: dict[type, str] = {}


def hooked_cache(kwargs: Mapping[str, Any]) -> Cache:
    """The KV cache a layer's forward call received, under either keyword (see :func:`cache_kwargs`)."""
    cache = kwargs.get("cache")
    cache = kwargs.get("past_key_values") if cache is None else cache
    if cache is None:
        msg = "scoring and eviction hooks need the forward call to use a KV cache (pass a DynamicCache())."
        raise RuntimeError(msg)
    return cache


def empty_cache() -> DynamicCache:
    """An empty cache that keeps every position of every layer (no sliding-window truncation), so the scoring
    sees all keys; its layers are made on first use."""
    from transformers import DynamicCache

    return DynamicCache()


def cache_from_tensors(layers: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding, in layer ``i``, the ``i``-th ``(keys, values)`` ``[batch, kv_heads, tokens, head_dim]``;
    like :func:`empty_cache` when there are none."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(layers))


def cache_tensors(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)`` ``[batch, kv_heads, tokens, head_dim]``, in layer order."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def layer_keys(cache: Cache, index: int) -> torch.Tensor:
    """The keys ``[batch, kv_heads, tokens, head_dim]`` cached for layer ``index``."""
    return cache.layers[index].keys


def cache_layers(cache: Cache) -> list[Any]:
    """The cache's layers in order, to pass to :func:`layer_bytes`, :func:`keep_layer_entries` and
    :func:`kept_entries`."""
    layers: list[Any] = cache.layers
    return layers


def kv_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """Layers, KV heads and head dim of ``model``'s attention."""
    config = model.config.get_text_config(decoder=True)
    head_dim = config_head_dim(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(config.num_hidden_layers), int(kv_heads), int(head_dim)


def cache_bytes(cache: Cache) -> int:
    """Bytes of all keys and values held in ``cache``."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def layer_bytes(layer: Any) -> int:
    """Bytes of the keys and values held in one cache layer (0 for a layer not filled)."""
    if getattr(layer, "keys", None) is None:
        return 0
    return int((layer.keys.numel() + layer.values.numel()) * layer.keys.element_size())


def keep_layer_entries(layer: Any, keep: torch.Tensor) -> None:
    """Keep only the sequence positions ``keep`` of each KV head in one cache layer, in place.

    ``keep`` is ``[k]`` for every head alike or ``[batch, kv_heads, k]``.
    """
    layer.keys, layer.values = kept_entries(layer, keep)


def kept_entries(layer: Any, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(keys, values)`` tensors of the positions ``keep`` of each KV head in one cache layer.

    ``keep`` is ``[k]`` for every head alike or ``[batch, kv_heads, k]``; the layer is not changed.
    """
    batch, kv_heads, _, dim = layer.keys.shape
    rows = keep.to(layer.keys.device).expand(batch, kv_heads, -1)
    gather = rows[..., None].expand(-1, -1, -1, dim)
    with torch.inference_mode():
        return layer.keys.gather(2, gather), layer.values.gather(2, gather)
