"""`search_docs` / `open_doc`: BM25 search over local documents, by default the Python standard library's own
documentation as this interpreter ships it (agents.md §2.5; nothing is downloaded).

A stdlib document is one public module: its docstring, then each public top-level function and class with its
signature and the first paragraph of its docstring (a class also lists its public methods), read from the `.py`
source with `ast`, never imported (importing runs code: `antigravity` opens a browser). Test suites, private modules
(`_pydecimal`) and generated data (`pydoc_data`) are left out. The index is built once, at the first search, and kept
in memory (575 documents, 0.5 MB of text; 1.5-3 s here, nearly all of it `ast.parse`).

Ranking: BM25 (k1 1.2, b 0.75) over lower-cased word tokens with a light suffix stemmer ("parsing", "parses" and
"parse" meet), the title's words counted twice more; ties are broken by title, so results are deterministic.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import math
import re
import sysconfig
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

from internlm2_jax.agents.tools.base import ToolError, tool

K1, B = 1.2, 0.75
TITLE_WEIGHT = 2  # extra counts of each title word: the module named "gzip" is about gzip
SNIPPET_CHARS = 300
PAGE_CHARS = 2000
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data",
                 "turtledemo"}
_WORD = re.compile(r"[a-z0-9]+")
_TWIN = re.compile(rb"^\s*from (_py\w+) import \*", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Document:
    title: str
    text: str


def terms(text: str) -> list[str]:
    return [_stem(word) for word in _WORD.findall(text.lower())]


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            word = word[:-len(suffix)]
            if suffix in ("ing", "ed") and word[-1] == word[-2] and word[-1] not in "aeioudflsz":
                word = word[:-1]  # "gzipped" -> "gzip", "stopping" -> "stop"
            break
    return word[:-1] if len(word) > 3 and word.endswith("e") else word


class DocIndex:
    """BM25 over `documents` (titles unique)."""

    def __init__(self, documents: Iterable[Document]):
        self.documents = sorted(documents, key=lambda doc: doc.title)
        self._by_title = {doc.title: doc for doc in self.documents}
        if len(self._by_title) != len(self.documents):
            raise ValueError("document titles must be unique")
        self._postings: dict[str, list[tuple[int, int]]] = {}
        self._lengths = []
        for i, doc in enumerate(self.documents):
            counts = Counter(terms(doc.text)) + Counter(terms(doc.title.replace(".", " ")) * TITLE_WEIGHT)
            self._lengths.append(sum(counts.values()))
            for term, count in counts.items():
                self._postings.setdefault(term, []).append((i, count))
        self._average = sum(self._lengths) / max(len(self._lengths), 1)

    @classmethod
    def from_folder(cls, folder: str | Path, pattern: str = "**/*.md") -> DocIndex:
        """Text files under `folder` matching `pattern`, titled by their path relative to it."""
        root = Path(folder)
        return cls(Document(path.relative_to(root).as_posix(), path.read_text(encoding="utf-8", errors="replace"))
                   for path in root.glob(pattern) if path.is_file())

    def search(self, query: str, k: int = 3) -> list[tuple[Document, float]]:
        """The `k` best documents with their BM25 scores, best first; documents sharing no term are left out."""
        scores: dict[int, float] = {}
        n = len(self.documents)
        for term in dict.fromkeys(terms(query)):
            postings = self._postings.get(term, ())
            idf = math.log(1 + (n - len(postings) + 0.5) / (len(postings) + 0.5))
            for i, count in postings:
                norm = count + K1 * (1 - B + B * self._lengths[i] / self._average)
                scores[i] = scores.get(i, 0.0) + idf * count * (K1 + 1) / norm
        best = sorted(scores, key=lambda i: (-scores[i], self.documents[i].title))[:k]
        return [(self.documents[i], scores[i]) for i in best]

    def get(self, title: str) -> Document:
        """The document titled `title`; ToolError naming the nearest titles when there is none."""
        if title in self._by_title:
            return self._by_title[title]
        near = difflib.get_close_matches(title, list(self._by_title), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else "; search_docs finds titles"
        raise ToolError(f"no document titled {title!r}{hint}")


def snippet(doc: Document, query: str, limit: int = SNIPPET_CHARS) -> str:
    """The text from the line sharing the most query terms (the first such line; the start when none does), about
    `limit` characters of it."""
    wanted = set(terms(query))
    lines = [line.strip() for line in doc.text.splitlines() if line.strip()]
    if not lines:
        return ""
    best = max(range(len(lines)), key=lambda i: (len(wanted & set(terms(lines[i]))), -i))
    text = " ".join(lines[best:best + 8])
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


# ---- the standard library as documents ---------------------------------------------------------------------------


def stdlib_documents(root: Path | None = None) -> list[Document]:
    root = root or Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if _SKIPPED_DIRS & set(parts) or any(part.startswith("_") and part != "__init__" for part in parts):
            continue
        title = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        module = _parse(path)
        if module is None:
            continue
        text = module_text(module)
        # `decimal` and `datetime` are `from _decimal import *` with a pure-Python twin (`_pydecimal`) imported when
        # that fails; the twin holds the documentation, so the public name gets its text.
        twin = None if ast.get_docstring(module) else _TWIN.search(path.read_bytes())
        twin_module = _parse(root / f"{twin.group(1).decode()}.py") if twin else None
        if twin_module is not None:
            text = f"{module_text(twin_module)}\n\n{text}".strip()
        if text:
            documents.append(Document(title, text))
    return documents


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):  # gone, or deliberately not Python 3 (lib2to3 test data)
        return None


def module_text(module: ast.Module) -> str:
    """The module's docstring, then its public functions and classes, each with the first paragraph of its own."""
    parts = [ast.get_docstring(module) or ""]
    for node in module.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        summary = (ast.get_docstring(node) or "").split("\n\n")[0].strip()
        if isinstance(node, ast.ClassDef):
            methods = [item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                       and not item.name.startswith("_")]
            head = f"class {node.name}" + (f" (methods: {', '.join(methods)})" if methods else "")
        else:
            head = f"{node.name}({ast.unparse(node.args)})"
        parts.append(f"{head}: {summary}" if summary else head)
    return "\n\n".join(part for part in parts if part).strip()


@functools.cache
def stdlib_index() -> DocIndex:
    return DocIndex(stdlib_documents())


# ---- the tools ---------------------------------------------------------------------------------------------------


@tool
def search_docs(query: str, k: Annotated[int, {"minimum": 1, "maximum": 10}] = 3) -> list[dict[str, str]]:
    """Search the Python standard library's documentation. Returns the titles (module names) and snippets of the
    best matches; read one with open_doc.

    Args:
        query: What to look for, in words, e.g. "parse command line arguments".
        k: How many results to return.
    """
    return [{"title": doc.title, "snippet": snippet(doc, query)} for doc, _ in stdlib_index().search(query, k)]


@tool
def open_doc(title: str, offset: Annotated[int, {"minimum": 0}] = 0) -> str:
    """Read a document found by search_docs, a page at a time.

    Args:
        title: The document's title, e.g. "argparse".
        offset: Where to start reading, in characters (the end of the last page says where the next one starts).
    """
    text = stdlib_index().get(title).text
    return page(text, offset)


def page(text: str, offset: int, size: int = PAGE_CHARS) -> str:
    """`size` characters of `text` from `offset`, with a last line saying how to read on when there is more."""
    chunk = text[offset:offset + size]
    rest = len(text) - offset - len(chunk)
    return f"{chunk}\n…[{rest} more characters; read on with offset={offset + size}]" if rest > 0 else chunk
