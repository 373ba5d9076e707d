"""Safety filtering (InternLM2 report §3.1): remove documents from blocked domains or with blocked words.

- Domains: a document is blocked when the host of its URL, or any parent domain of it, is on the domain list
  (`a.b.evil.com` is blocked by `evil.com`). Hosts are compared lowercased, without `www.`, port or user info;
  a missing or invalid URL is not blocked.
- Words: a list entry without CJK characters is a word or phrase matched on word boundaries, case-insensitively:
  `class` does not match `classic`, and `free money` matches `Free money` and `free-money` (punctuation separates
  words in the entries as in the text). An entry with CJK characters (Chinese, Japanese) matches anywhere in a run
  of non-space text, as those scripts put no spaces between words. Every occurrence of every entry counts, so
  overlapping entries (`money` and `free money`) both count in `free money`. A document with more than
  `max_blocked_words` occurrences is removed.

Matching costs about the same whatever the list's size (the report's list has ~36k entries): the document's words
and word n-grams (up to the longest phrase) are looked up in sets, and so are the substrings of its CJK runs (up to
the longest CJK entry, starting at characters that begin an entry).

No JAX here: this runs in every worker process of the curation pipeline.
"""

import dataclasses
import re
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from internlm2_jax.data.curation.cleaning import CJK_RANGES

EXAMPLE = "example"  # a list path meaning the example list shipped in `blocklists/` (write ./example for a file)
_EXAMPLE_LISTS = Path(__file__).parent / "blocklists"
_TOP_MATCHES = 5  # matched entries reported per document

# Words for matching: runs of letters and digits (underscore separates words too), without CJK characters.
_TOKEN = re.compile(f"[^\\W_{CJK_RANGES}]+")
_CJK_CHAR = re.compile(f"[{CJK_RANGES}]")
# A run of non-space text with a CJK character in it; the lookahead runs once per run (it starts after a space).
_CJK_RUN = re.compile(f"(?<!\\S)(?=[^\\s{CJK_RANGES}]*[{CJK_RANGES}])\\S+")
_HOST = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*|[0-9a-f:.]+")  # a domain name, an IPv4 or IPv6 address


class BlocklistError(ValueError):
    """A blocklist file that cannot be read or has a malformed entry; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
    domain_blocklist: str | None = None  # file: one domain per line; "example": the shipped example list
    word_blocklist: str | None = None  # file: one word or phrase per line; "example": the shipped example list
    max_blocked_words: int = 0  # a document with more occurrences of blocked words is removed

    def __post_init__(self):
        for name in ("domain_blocklist", "word_blocklist"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name}: expected a file path, {EXAMPLE!r} or None, got {value!r}")
        if isinstance(self.max_blocked_words, bool) or not isinstance(self.max_blocked_words, int) \
                or self.max_blocked_words < 0:
            raise ValueError(f"max_blocked_words: expected an integer >= 0, got {self.max_blocked_words!r}")

    @classmethod
    def example(cls, **overrides) -> "SafetyConfig":
        """Both shipped example lists (placeholders, to try the pipeline; a real run needs real lists)."""
        return cls(**({"domain_blocklist": EXAMPLE, "word_blocklist": EXAMPLE} | overrides))


@dataclasses.dataclass(frozen=True)
class SafetyResult:
    passed: bool
    reasons: tuple[str, ...]  # "blocked_domain", "blocked_words"
    counts: dict[str, int]  # {"blocked_domain": 0 or 1, "blocked_words": occurrences}
    matches: dict[str, int]  # the most frequent matched word entries (a few), with their occurrences
    domain: str | None = None  # the list entry that blocks the URL


def url_host(url: str | None) -> str | None:
    """The host of `url`: lowercased, IDNA-encoded, without `www.`, port, user info or trailing dot. None when
    there is no URL or it has no valid host. A URL without a scheme (`evil.com/page`) is read as host and path."""
    if not isinstance(url, str) or not url.strip():
        return None
    url = url.strip()
    if "://" not in url and not url.startswith("//"):
        url = "//" + url
    try:
        host = urlsplit(url).hostname
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return None
    if not host:
        return None
    host = host.rstrip(".").removeprefix("www.")
    try:
        host = host.encode("idna").decode("ascii")  # `例子.测试` and `xn--fsqu00a.xn--0zwm56d` are one host
    except UnicodeError:
        pass  # not IDNA-encodable (e.g. an empty label): the pattern below decides
    return host if _HOST.fullmatch(host) else None


def _read_entries(path: str, what: str):
    """("file:line", entry) for the non-blank, non-comment lines of a list file ("example": the shipped one)."""
    file = _EXAMPLE_LISTS / f"example_{what}.txt" if path == EXAMPLE else Path(path)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise BlocklistError(f"{what} blocklist {file}: cannot read it: {e.strerror or e}") from None
    if b"\0" in data:
        line = data[:data.index(b"\0")].count(b"\n") + 1
        raise BlocklistError(f"{file}:{line}: a NUL byte; a blocklist is a UTF-8 text file, not binary data")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise BlocklistError(f"{file}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield f"{file}:{number}", line


def load_domains(path: str) -> frozenset[str]:
    """A domain list: one domain per line (`#` starts a comment); a URL or a `www.`/`*.` prefix is reduced to the
    domain."""
    domains = set()
    for where, line in _read_entries(path, "domains"):
        entry = line.split("#", 1)[0].strip().removeprefix("*.")
        host = url_host(entry)
        if host is None:
            raise BlocklistError(f"{where}: not a domain: {entry!r}")
        domains.add(host)
    return frozenset(domains)


def load_words(path: str) -> tuple[dict[int, frozenset[tuple[str, ...]]], frozenset[str]]:
    """A word list: one word or phrase per line (lines starting with `#` are comments). Returns the word entries
    as lowercased token tuples by length, and the entries with CJK characters, lowercased."""
    phrases: dict[int, set[tuple[str, ...]]] = {}
    substrings = set()
    for where, entry in _read_entries(path, "words"):
        entry = entry.lower()
        if _CJK_CHAR.search(entry):
            if re.search(r"\s", entry):
                raise BlocklistError(f"{where}: an entry with CJK characters has no spaces (it matches anywhere "
                                     f"in the text): {entry!r}")
            substrings.add(entry)
            continue
        tokens = tuple(_TOKEN.findall(entry))
        if not tokens:
            raise BlocklistError(f"{where}: no letters or digits to match: {entry!r}")
        phrases.setdefault(len(tokens), set()).add(tokens)
    return {n: frozenset(p) for n, p in phrases.items()}, frozenset(substrings)


class SafetyFilter:
    """The configured lists, loaded once (a worker process builds one filter), and the checks."""

    def __init__(self, config: SafetyConfig):
        self.config = config
        self.domains = load_domains(config.domain_blocklist) if config.domain_blocklist else frozenset()
        self.phrases, self.substrings = ({}, frozenset()) if not config.word_blocklist else load_words(
            config.word_blocklist)
        # First character of a CJK entry -> the lengths of the entries that start with it.
        starts: dict[str, set[int]] = {}
        for entry in self.substrings:
            starts.setdefault(entry[0], set()).add(len(entry))
        self._substring_lengths = {char: tuple(sorted(lengths)) for char, lengths in starts.items()}

    def blocked_domain(self, url: str | None) -> str | None:
        """The list entry that blocks `url` (its host or a parent domain), or None."""
        host = url_host(url) if self.domains else None
        if host is None:
            return None
        labels = host.split(".")
        return next((d for d in (".".join(labels[i:]) for i in range(len(labels))) if d in self.domains), None)

    def blocked_words(self, text: str) -> Counter:
        """Occurrences of each word-list entry in `text` (entries lowercased, phrases with single spaces)."""
        found: Counter = Counter()
        if not (self.phrases or self.substrings):
            return found
        lowered = text.lower()
        if self.phrases:
            tokens = _TOKEN.findall(lowered)
            for n, phrases in self.phrases.items():
                grams = zip(*(tokens[i:] for i in range(n)), strict=False)  # n-grams, built and filtered in C
                found.update(" ".join(gram) for gram in filter(phrases.__contains__, grams))
        if self.substrings:
            for run in _CJK_RUN.findall(lowered):
                for i, char in enumerate(run):
                    for length in self._substring_lengths.get(char, ()):
                        if run[i:i + length] in self.substrings:
                            found[run[i:i + length]] += 1
        return found

    def check(self, text: str, url: str | None = None) -> SafetyResult:
        domain = self.blocked_domain(url)
        found = self.blocked_words(text)
        occurrences = sum(found.values())
        reasons = (("blocked_domain",) if domain is not None else ()) + (
            ("blocked_words",) if occurrences > self.config.max_blocked_words else ())
        return SafetyResult(passed=not reasons, reasons=reasons,
                            counts={"blocked_domain": int(domain is not None), "blocked_words": occurrences},
                            matches=dict(found.most_common(_TOP_MATCHES)), domain=domain)
