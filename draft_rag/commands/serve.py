"""``draft-rag serve``: an OpenAI-compatible gateway that compresses retrieved documents before any LLM server.

Clients send chat completions to the gateway instead of the server; documents in a ``documents`` field or in
``<document>...</document>`` blocks are shortened with SpecPC to ``--budget`` tokens, and the request goes on
to ``--upstream``. Keys are best given through the environment (``DRAFT_RAG_API_KEY``,
``DRAFT_RAG_UPSTREAM_API_KEY``), which ``ps`` does not show.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Any

from draft_rag.models import DEFAULT_DRAFT
from draft_rag.serve.settings import SETTINGS_ENV, GatewaySettings

API_KEY_ENV = "DRAFT_RAG_API_KEY"
UPSTREAM_API_KEY_ENV = "DRAFT_RAG_UPSTREAM_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        f"Keys: --api-key and --upstream-api-key default to ${API_KEY_ENV} and ${UPSTREAM_API_KEY_ENV}; prefer "
        "the environment, since command-line arguments are visible to every user of the machine (ps)."
    )
    parser.add_argument("--upstream", required=True,
                        help="base URL of the OpenAI-compatible server to forward to, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8100, help="port to listen on (8100)")
    parser.add_argument("--budget", type=int, default=1024,
                        help="tokens of document text kept per request unless it asks otherwise (1024)")
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help=f"SpecPC draft model name, id or path ({DEFAULT_DRAFT})")
    parser.add_argument("--dtype", default=None, help="draft dtype, e.g. bfloat16 or float32 (default: per hardware)")
    parser.add_argument("--device", default=None, help="draft device, e.g. cpu or cuda:1 (default: CUDA if present)")
    parser.add_argument("--cache-dir", default=None,
                        help="keep the draft cache in this directory, shared by every worker and gateway naming it")
    parser.add_argument("--workers", type=int, default=1, help="gateway processes on the port, each with a draft (1)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"key clients must send as 'Authorization: Bearer KEY' (default ${API_KEY_ENV}; none)")
    parser.add_argument("--upstream-api-key", default=os.environ.get(UPSTREAM_API_KEY_ENV) or None,
                        help=f"key sent to the upstream instead of the client's (default ${UPSTREAM_API_KEY_ENV})")
    parser.add_argument("--target-tokenizer", default=None,
                        help="tokenizer (name or path) of the upstream's model, so budgets count its tokens")
    parser.add_argument("--max-request-bytes", type=int, default=16 << 20,
                        help="largest request body accepted; larger ones get 413 (16 MiB)")
    parser.add_argument("--queue-size", type=int, default=64,
                        help="most compressions waiting or running; more get 503 with Retry-After (64)")
    parser.add_argument("--connect-timeout", type=float, default=10.0,
                        help="seconds to connect to the upstream before 504 (10)")
    parser.add_argument("--read-timeout", type=float, default=600.0,
                        help="seconds to wait for the upstream's next bytes before 504 (600)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level (info)")


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    """The gateway settings the arguments describe (checked: a bad value raises a ValueError naming it)."""
    return GatewaySettings(
        upstream=args.upstream, host=args.host, port=args.port, budget=args.budget, draft=args.draft,
        dtype=args.dtype, device=args.device, cache_dir=args.cache_dir, workers=args.workers,
        api_key=args.api_key, upstream_api_key=args.upstream_api_key, target_tokenizer=args.target_tokenizer,
        max_request_bytes=args.max_request_bytes, queue_size=args.queue_size,
        connect_timeout=args.connect_timeout, read_timeout=args.read_timeout,
    )


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
