"""``draft-rag serve``: an OpenAI-compatible gateway that compresses retrieved documents before any LLM server.

Clients send chat completions to the gateway instead of the server; documents in a ``documents`` field or in
``<document>...</document>`` blocks are shortened with SpecPC to ``--budget`` tokens, and the request goes on
to ``--upstream``. With ``--target`` instead (engine mode) the server answers with that model itself, with
SpecKV (``--method``, ``--kv-budget``), batching the requests that arrive together. Keys are best given through
the environment (``DRAFT_RAG_API_KEY``, ``DRAFT_RAG_UPSTREAM_API_KEY``), which ``ps`` does not show.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Any

from draft_rag.models import DEFAULT_DRAFT
from draft_rag.serve.settings import ENGINE_SETTINGS, SETTINGS_ENV, UPSTREAM_SETTINGS, GatewaySettings, check_mode
from draft_rag.specpc import OBSERVE_FROM

API_KEY_ENV = "DRAFT_RAG_API_KEY"
UPSTREAM_API_KEY_ENV = "DRAFT_RAG_UPSTREAM_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Modes: --upstream URL forwards each request, its documents compressed, to that server (gateway mode); "
        "--target NAME answers with that model itself, with SpecKV, batching requests that arrive together "
        "(engine mode). Give one of them; the options marked (gateway) or (engine) belong to that mode only. "
        f"Keys: --api-key and --upstream-api-key default to ${API_KEY_ENV} and ${UPSTREAM_API_KEY_ENV}; prefer "
        "the environment, since command-line arguments are visible to every user of the machine (ps)."
    )
    parser.add_argument("--upstream", default=None,
                        help="gateway mode: base URL of the OpenAI-compatible server to forward to, "
                             "e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--target", default=None,
                        help="engine mode: the model that answers (packaged name, Hugging Face id, path or .gguf)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8100, help="port to listen on (8100)")
    parser.add_argument("--budget", type=int, default=1024,
                        help="tokens of document text kept per request unless it asks otherwise (1024)")
    parser.add_argument("--observe-from", default=GatewaySettings.observe_from, choices=OBSERVE_FROM,
                        help="which draft queries score the documents: the question's own tokens (question; auto "
                             "is the same here, the gateway reads over its cache) or the last 64 prompt positions, "
                             "the last document's tail included (window) (question)")
    parser.add_argument("--rescore-factor", type=int, default=GatewaySettings.rescore_factor, metavar="K",
                        help="0: select from the draft's reading over the cache (0); K >= 2: candidates at K x the "
                             "budget, read again by the draft without the cache (closer to reading the documents "
                             "together, slower: a draft pass over about K x budget tokens per request)")
    parser.add_argument("--recompute-factor", type=int, default=GatewaySettings.recompute_factor, metavar="K",
                        help="0: select from the draft's reading over the cache (0); K >= 2: candidates at K x the "
                             "budget, their draft K/V computed again in context over the cache, then read again "
                             "(slower: a draft forward over K x budget tokens per request); not with "
                             "--rescore-factor")
    parser.add_argument("--draft", default=DEFAULT_DRAFT,
                        help=f"SpecPC's (and in engine mode SpecKV's) draft model name, id or path ({DEFAULT_DRAFT})")
    parser.add_argument("--dtype", default=None,
                        help="draft (and target) dtype, e.g. bfloat16 or float32 (default: per hardware)")
    parser.add_argument("--device", default=None,
                        help="draft (and target) device, e.g. cpu or cuda:1 (default: CUDA if present)")
    parser.add_argument("--cache-dir", default=None,
                        help="keep the draft cache in this directory, shared by every worker and gateway naming it")
    parser.add_argument("--workers", type=int, default=1,
                        help="gateway processes on the port, each with a draft (1; engine mode serves from one)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"key clients must send as 'Authorization: Bearer KEY' (default ${API_KEY_ENV}; none)")
    parser.add_argument("--upstream-api-key", default=None,
                        help=f"(gateway) key sent to the upstream instead of the client's "
                             f"(default ${UPSTREAM_API_KEY_ENV})")
    parser.add_argument("--target-tokenizer", default=None,
                        help="(gateway) tokenizer (name or path) of the upstream's model, so budgets count its "
                             "tokens; engine mode counts the target's")
    parser.add_argument("--max-request-bytes", type=int, default=16 << 20,
                        help="largest request body accepted; larger ones get 413 (16 MiB)")
    parser.add_argument("--queue-size", type=int, default=64,
                        help="most compressions (and in engine mode generations) waiting or running; more get 503 "
                             "with Retry-After (64)")
    parser.add_argument("--connect-timeout", type=float, default=None,
                        help="(gateway) seconds to connect to the upstream before 504 (10)")
    parser.add_argument("--read-timeout", type=float, default=None,
                        help="(gateway) seconds to wait for the upstream's next bytes before 504 (600)")
    parser.add_argument("--method", default=None,
                        help="(engine) KV-cache method: speckv (default), snapkv, streamingllm or full")
    parser.add_argument("--kv-budget", type=int, default=None,
                        help="(engine) prompt KV entries kept per layer and KV head unless a request asks "
                             "otherwise (256)")
    parser.add_argument("--lookahead-tokens", type=int, default=None,
                        help="(engine) SpecKV draft answer tokens (default: up to each request's max_tokens)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="(engine) most requests answered together in one batch (16)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="(engine) completion tokens of a request that does not say (256)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level (info)")


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    """The settings the arguments describe (checked: a bad value, or an option of the other mode, raises a
    ValueError naming it)."""
    # The options of one mode default to None here, so that one given for the other mode is seen even when it
    # repeats the default; the settings hold the defaults.
    given = {name: getattr(args, name) for name in (*UPSTREAM_SETTINGS, *ENGINE_SETTINGS)
             if getattr(args, name, None) is not None}
    if args.target is None and "upstream_api_key" not in given and os.environ.get(UPSTREAM_API_KEY_ENV):
        given["upstream_api_key"] = os.environ[UPSTREAM_API_KEY_ENV]
    settings = GatewaySettings(
        upstream=args.upstream, target=args.target, host=args.host, port=args.port, budget=args.budget,
        observe_from=args.observe_from, rescore_factor=args.rescore_factor,
        recompute_factor=args.recompute_factor, draft=args.draft, dtype=args.dtype,
        device=args.device,
        cache_dir=args.cache_dir, workers=args.workers,
        api_key=args.api_key, max_request_bytes=args.max_request_bytes, queue_size=args.queue_size, **given,
    )
    check_mode(settings.engine_mode, given)
    return settings


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging setup with the gateway's own logger added at ``level``."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["draft_rag"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from draft_rag.serve.app import create_app
    except ImportError as error:
        msg = f"draft-rag serve needs its extra: pip install 'draft-rag[serve]' ({error})"
        raise ImportError(msg) from None

    settings = settings_from_args(args)
    options: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_config": log_config(args.log_level),
                               "log_level": args.log_level}
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **options)
        return 0
    # Workers are new processes that import the app by name: the settings travel in the environment, which
    # (unlike the command line) other users cannot read.
    os.environ[SETTINGS_ENV] = settings.to_json()
    uvicorn.run("draft_rag.serve.app:app_from_environment", factory=True, workers=settings.workers, **options)
    return 0
