"""Tests of the LangChain and LlamaIndex adapters.

The adapters live beside the core package (``integrations/``); importing this package puts them on the
path, so the tests run from a source checkout as well as from an installed distribution.
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
for _source in (_ROOT / "integrations" / "langchain", _ROOT / "integrations" / "llama_index"):
    if str(_source) not in sys.path:
        sys.path.insert(0, str(_source))
