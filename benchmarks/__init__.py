"""One-off studies of draft-rag: each measures one question and writes its rows and table to ``--out``.

Run them from the repository root as ``python -m benchmarks.<name>`` (see ``benchmarks/README.md``). They are
not part of the installed package; ``draft-rag bench`` (:mod:`draft_rag.bench`) is the benchmark that ships.
"""
