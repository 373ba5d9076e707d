"""The embedded default corpus: the running interpreter's Python standard library, a real code corpus on every
machine (the report stresses code data), with a deterministic held-out split and a basic cleaning step.

- Files are the stdlib's `*.py` files (not site-packages; the stdlib's own test suites only with
  `include_tests=True`: they are large and unusual code).
- The split is decided per file by a hash of its path relative to the stdlib root, so a file is on the same side
  on every machine and Python patch release, whatever `max_bytes` is (`heldout_fraction` of files are held out).
- Files are taken in hash order (a fixed pseudo-random order, so a `max_bytes` cap samples the whole library rather
  than its alphabetical start) until `max_bytes` of cleaned text is collected.
- `basic_clean` is the curation pipeline's code cleaning; `recipes.stdlib_data.prepare_stdlib_dataset` runs the
  whole pipeline (tokenizer, quality classifier, curation, shards and manifests) over this corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sysconfig
from pathlib import Path

from internlm2_jax.data.curation.cleaning import CleaningConfig, apply_cleaning

_TEST_DIRS = {"test", "tests", "idle_test"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class CorpusDocument:
    name: str  # path relative to the stdlib root, e.g. "json/decoder.py"
    text: str


def basic_clean(text: str) -> str | None:
    """The code preset of the curation pipeline's rule-based cleaning, keeping blank-line runs: the normalised text,
    or None when a rule drops it (empty, binary or mostly non-text, generated, or with an overlong line)."""
    return apply_cleaning(text, CleaningConfig.for_code(max_blank_lines=None)).text


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _path_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def stdlib_files(*, include_tests: bool = False) -> list[str]:
    """Relative paths of the stdlib's `.py` files, in hash order."""
    root = stdlib_root()
    names = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if _SKIP_DIRS & set(parts) or (not include_tests and _TEST_DIRS & set(parts[:-1])):
            continue
        names.append("/".join(parts))
    return sorted(names, key=lambda name: (_path_hash(name), name))


def is_heldout(name: str, heldout_fraction: float) -> bool:
    return _path_hash(name) % 10_000 < round(heldout_fraction * 10_000)


def stdlib_corpus(split: str = "train", max_bytes: int | None = None, *, heldout_fraction: float = 0.05,
                  include_tests: bool = False, clean: bool = True) -> list[CorpusDocument]:
    """Cleaned documents of one split ("train" or "heldout") of the stdlib corpus, up to `max_bytes` of UTF-8 text.

    Files that are not valid UTF-8 (a few test files declare other encodings) or that `basic_clean` drops are left
    out; the split itself does not depend on cleaning or on `max_bytes`.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    root = stdlib_root()
    documents, total = [], 0
    for name in stdlib_files(include_tests=include_tests):
        if is_heldout(name, heldout_fraction) != (split == "heldout"):
            continue
        try:
            text = (root / name).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if clean:
            text = basic_clean(text)
            if text is None:
                continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            continue  # over the cap: a smaller file further on may still fit
        documents.append(CorpusDocument(name, text))
        total += size
    return documents


def split_source(doc: CorpusDocument, max_chars: int = 2000) -> list[CorpusDocument]:
    """Cuts a source file into pieces of at most about `max_chars` at top-level boundaries (a blank line followed
    by an unindented line), so a small batch mixes many files instead of holding one long file.

    A single top-level block longer than `max_chars` stays whole; the packer cuts it at row ends.
    """
    pieces, current, size = [], [], 0
    lines = doc.text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        at_boundary = i > 0 and not lines[i - 1].strip() and line[:1] not in (" ", "\t", "\n", "")
        if at_boundary and current and size + len(line) > max_chars:
            pieces.append("".join(current).strip("\n"))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current).strip("\n"))
    return [CorpusDocument(f"{doc.name}#{k}", text) for k, text in enumerate(pieces) if text]
