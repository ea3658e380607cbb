"""SpecPC in front of a remote OpenAI-compatible target (e.g. a vLLM server running a large model).

The draft model compresses the retrieved chunks next to the retriever (CPU or a small GPU); only the
shortened context travels to the server, so the large target reads ``--budget`` tokens of context instead
of everything retrieved. Start a server, then point ``--base-url`` at it:

    vllm serve Qwen/Qwen2.5-7B-Instruct --tensor-parallel-size 2 --port 8000
    python examples/remote_target.py --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct

Any OpenAI-compatible endpoint works (vLLM, SGLang, llama.cpp server, TGI's Messages API, OpenAI itself with
``OPENAI_API_KEY``). Pass the target's tokenizer with ``--target-tokenizer`` (a local path or id) so the
budget counts the target's tokens; by default the draft's tokens are counted.
"""

from __future__ import annotations

import os

from langchain_rag import QUESTIONS, ask_all, build_chain, build_retriever, compressed, make_parser


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--base-url", default="http://localhost:8000/v1", help="the server's /v1 URL")
    parser.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct", help="model name the server serves")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                        help="API key (vLLM accepts any unless started with --api-key)")
    parser.add_argument("--target-tokenizer", default=None, help="tokenizer of the remote model, for the budget")
    args = parser.parse_args(argv)

    from langchain_openai import ChatOpenAI
    from transformers import AutoTokenizer

    from draft_rag.models import load_model

    llm = ChatOpenAI(base_url=args.base_url, api_key=args.api_key, model=args.model, max_tokens=args.max_tokens,
                     temperature=0)
    tokenizer = (AutoTokenizer.from_pretrained(args.target_tokenizer) if args.target_tokenizer
                 else load_model(args.draft).tokenizer)
    retriever = build_retriever(args)
    if not args.no_compress:
        retriever = compressed(retriever, args, tokenizer)
    ask_all(build_chain(retriever, llm), args.questions or QUESTIONS, lambda text: len(tokenizer.encode(text)))


if __name__ == "__main__":
    main()
