"""MinHash signatures and LSH banding for fuzzy deduplication (the InternLM2 report: MinHash over word 5-gram
shingles, 128 hash functions, Jaccard threshold 0.7). Pure numpy, vectorised over batches of documents: no Python
loop runs per word or per shingle.

Word segmentation (after `str.lower()`, the full Unicode lower-casing), over code points:
- A token is a maximal run of word characters: ASCII letters, digits and `_`, and every non-ASCII code point that is
  neither a separator nor a one-character token (so accented Latin, Cyrillic, Greek, Arabic, ... letters and
  combining marks stay inside words).
- CJK ideographs (U+3400-4DBF, U+4E00-9FFF, U+F900-FAFF, U+20000-2FFFF), Hiragana/Katakana (U+3040-30FF) and Hangul
  syllables (U+AC00-D7AF) are each a one-character token: these scripts do not put spaces between words, so Chinese
  text shingles by characters.
- Separators: every other ASCII character (whitespace, punctuation, controls), Latin-1 signs and punctuation
  (U+0080-00BF except the letters U+00AA, U+00B5, U+00BA; U+00D7 and U+00F7), general punctuation and symbols
  (U+2000-2BFF), CJK punctuation (U+3000-303F), CJK compatibility forms (U+FE30-FE4F), full-width punctuation
  (U+FF00-FF0F, U+FF1A-FF20, U+FF3B-FF40, U+FF5B-FF65; full-width digits and letters are word characters), the BOM
  U+FEFF, specials U+FFF0-FFFF and lone surrogates. This approximates Unicode's punctuation/symbol categories
  with ranges, so the reference regex and the vectorised classifier share one table.

A shingle is `n` consecutive tokens joined by one space; a document with fewer than `n` tokens gives one shingle of
all its tokens, an empty one none. `words` and `shingles` are the plain-Python reference; `shingle_hashes` computes
64-bit hashes of the same shingle set without a Python loop over words, and the tests check that both agree.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

_U64 = np.uint64
_MAX32 = np.uint32(0xFFFFFFFF)

_SINGLE_RANGES = [(0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
                  (0x20000, 0x2FFFF)]
_SEPARATOR_RANGES = [(0x80, 0xA9), (0xAB, 0xB4), (0xB6, 0xB9), (0xBB, 0xBF), (0xD7, 0xD7), (0xF7, 0xF7),
                     (0x2000, 0x2BFF), (0x3000, 0x303F), (0xD800, 0xDFFF), (0xFE30, 0xFE4F), (0xFEFF, 0xFEFF),
                     (0xFF00, 0xFF0F), (0xFF1A, 0xFF20), (0xFF3B, 0xFF40), (0xFF5B, 0xFF65), (0xFFF0, 0xFFFF)]
_ASCII_NON_WORD = [(0x00, 0x2F), (0x3A, 0x40), (0x5B, 0x5E), (0x60, 0x60), (0x7B, 0x7F)]


def _char_class(ranges: list[tuple[int, int]]) -> str:
    return "".join(re.escape(chr(lo)) + ("-" + re.escape(chr(hi)) if hi > lo else "") for lo, hi in ranges)


_SINGLE = _char_class(_SINGLE_RANGES)
_TOKEN_RE = re.compile(f"[^{_char_class(_ASCII_NON_WORD + _SEPARATOR_RANGES)}{_SINGLE}]+|[{_SINGLE}]")

# Character class per code point (0 separator, 1 word character, 2 one-character token). Every range above ends
# below U+30000, so its last entry stands for all higher code points (all word characters). ASCII text is
# lower-cased and classified with `bytes.translate` over byte tables, faster than str.lower and a numpy gather.
_TOP = 0x30000
_CLASSES = np.ones(_TOP + 1, np.uint8)
for _lo, _hi in _ASCII_NON_WORD + _SEPARATOR_RANGES:
    _CLASSES[_lo:_hi + 1] = 0
for _lo, _hi in _SINGLE_RANGES:
    _CLASSES[_lo:_hi + 1] = 2
_ASCII_WORD = bytes(_CLASSES[:256] == 1)
_ASCII_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


def words(text: str) -> list[str]:
    """Reference tokeniser (see the module docstring)."""
    return _TOKEN_RE.findall(text.lower())


def shingles(text: str, n: int = 5) -> list[str]:
    """Reference shingles, in document order with repeats: `n` consecutive tokens joined by a space."""
    tokens = words(text)
    if len(tokens) < n:
        return [" ".join(tokens)] if tokens else []
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, a bijection of uint64 with full avalanche (wrapping arithmetic); in place."""
    z ^= z >> _U64(30)
    z *= _U64(0xBF58476D1CE4E5B9)
    z ^= z >> _U64(27)
    z *= _U64(0x94D049BB133111EB)
    z ^= z >> _U64(31)
    return z


# Polynomial hash base (odd, so invertible mod 2**64) and per-position weights of the tokens inside a shingle (odd,
# so no weight discards the top bits of a token hash).
_BASE = 0x100000001B3
_BASE_INVERSE = pow(_BASE, -1, 2**64)
_POSITION_WEIGHTS = _mix(np.arange(1, 65, dtype=_U64)) | _U64(1)


@functools.lru_cache(maxsize=8)
def _powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """B**i and B**-i mod 2**64 for i < size (numpy's integer products wrap, which is the arithmetic wanted)."""
    powers, inverse_powers = np.ones(size, _U64), np.ones(size, _U64)
    np.cumprod(np.full(size - 1, _BASE, _U64), out=powers[1:])
    np.cumprod(np.full(size - 1, _BASE_INVERSE, _U64), out=inverse_powers[1:])
    return powers, inverse_powers


def _code_points(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(code points, word-character mask, positions of one-character tokens, where each text starts) of the
    lower-cased texts joined by NUL, with a NUL before and after them: NUL is a separator, so no token spans two
    texts and every word run has a separator on both sides."""
    if all(text.isascii() for text in texts):  # one byte per character, lower-cased and classified by byte tables
        data = ("\0" + "\0".join(texts) + "\0").encode("ascii")
        cps = np.frombuffer(data.translate(_ASCII_LOWER), np.uint8)
        word = np.frombuffer(data.translate(_ASCII_WORD), bool)
        single = np.empty(0, np.intp)
        lengths = [len(text) for text in texts]
    else:
        lowered = [text.lower() for text in texts]  # lower-casing can change lengths ("\u0130"): offsets after it
        cps = np.frombuffer(("\0" + "\0".join(lowered) + "\0").encode("utf-32-le", "surrogatepass"), np.uint32)
        classes = _CLASSES.take(cps, mode="clip")  # code points past the table are word characters, like its last
        word, single = classes == 1, np.flatnonzero(classes == 2)
        lengths = [len(text) for text in lowered]
    return cps, word, single, np.cumsum([1] + [length + 1 for length in lengths[:-1]])


def _tokens(cps: np.ndarray, word: np.ndarray, single: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start offset, 64-bit hash) of every token, in text order."""
    # Word runs start and end where the word mask changes (it is False at both ends); one-character tokens are their
    # own run.
    edges = np.flatnonzero(word[1:] != word[:-1]) + 1
    starts, ends = edges[0::2], edges[1::2]
    if single.size:
        starts = np.sort(np.concatenate([starts, single]))
        ends = np.sort(np.concatenate([ends, single + 1]))
    # Token hash sum_j c_j * B**(j - s) over [s, e) from one prefix sum: (S[e] - S[s]) * B**-s. Code points inside a
    # token are never 0 (NUL is a separator), so the polynomial also encodes the token's length. The power tables
    # are cached at a few power-of-two sizes: 16 bytes per code point of the longest recent batch.
    powers, inverse_powers = _powers(1 << max(16, cps.size.bit_length()))
    prefix = np.empty(cps.size + 1, _U64)
    prefix[0] = 0
    np.multiply(cps, powers[:cps.size], out=prefix[1:])
    np.cumsum(prefix, out=prefix)
    return starts, _mix((prefix.take(ends) - prefix.take(starts)) * inverse_powers.take(starts))


def _document_shingles(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash, document index) of every shingle of the texts, repeats included. One pass over all the texts: the
    per-call overhead of numpy would otherwise dominate for short documents."""
    cps, word, single, text_starts = _code_points(texts)
    token_starts, tokens = _tokens(cps, word, single)
    doc_start = np.searchsorted(token_starts, text_starts)  # each document's first token
    counts = np.diff(doc_start, append=tokens.size)
    doc_end = doc_start + counts
    # Shingle i is a weighted sum of the mixed token hashes i..i+n-1, mixed again: order-sensitive, and a short
    # document's single shingle (fewer terms) does not collide with a full one.
    padded = np.concatenate([tokens, np.zeros(n - 1, _U64)])
    acc, term = np.zeros(tokens.size, _U64), np.empty(tokens.size, _U64)
    short = np.flatnonzero((counts > 0) & (counts < n))
    short_acc = np.zeros(short.size, _U64)
    for k in range(n):
        acc += np.multiply(padded[k:k + tokens.size], _POSITION_WEIGHTS[k], out=term)
        done = counts[short] == k + 1  # a document of k + 1 < n tokens: its one shingle is complete at its start
        short_acc[done] = acc[doc_start[short[done]]]
    full = np.ones(tokens.size, bool)  # token i starts a shingle when n tokens of its document are left
    for left in range(1, n):
        last = doc_end - left
        full[last[last >= doc_start]] = False
    docs = np.repeat(np.arange(len(texts)), np.maximum(counts - (n - 1), 0))
    return _mix(np.concatenate([acc[full], short_acc])), np.concatenate([docs, short])


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values by sort and compare (np.unique is much slower on uint64: benchmarks/RESULTS.md)."""
    values = np.sort(values)
    keep = np.ones(values.size, bool)
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """The distinct 64-bit hashes of `shingles(text, n)`, sorted."""
    if not 1 <= n <= len(_POSITION_WEIGHTS):
        raise ValueError(f"ngram must be in [1, {len(_POSITION_WEIGHTS)}], got {n}")
    return _unique(_document_shingles([text], n)[0])


@dataclasses.dataclass(frozen=True)
class MinHashConfig:
    """Shingling, signature and banding parameters. `bands`/`rows` left None are chosen by `optimal_banding` with
    the `fp_weight`/`fn_weight` policy below."""

    ngram: int = 5
    num_perm: int = 128
    threshold: float = 0.7
    seed: int = 1
    bands: int | None = None
    rows: int | None = None
    # Recall-leaning, because every candidate is verified (estimated Jaccard >= threshold over all num_perm rows)
    # before it becomes an edge: verification rejects the candidates well below the threshold, most of the area the
    # fp term weighs, whereas a missed pair is a duplicate left in the corpus for good. 0.2/0.8 gives 18 bands of 7
    # rows: P(candidate) = 0.986 at J = 0.8 (0.867 with datasketch's symmetric 14 x 9). Candidates just below the
    # threshold still pass verification about half the time (the estimate's noise is ~0.04 at 128 rows), which
    # bounds the precision either way.
    fp_weight: float = 0.2
    fn_weight: float = 0.8

    def __post_init__(self):
        for field in ("ngram", "num_perm", "seed"):
            if not isinstance(getattr(self, field), int | np.integer):
                raise ValueError(f"{field} must be an int, got {getattr(self, field)!r}")
        if not 1 <= self.ngram <= len(_POSITION_WEIGHTS):
            raise ValueError(f"ngram must be in [1, {len(_POSITION_WEIGHTS)}], got {self.ngram}")
        if self.num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {self.num_perm}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if (self.bands is None) != (self.rows is None):
            raise ValueError(f"bands and rows must be given together, got bands={self.bands}, rows={self.rows}")
        if self.bands is not None:
            if self.bands < 1 or self.rows < 1:
                raise ValueError(f"bands and rows must be >= 1, got bands={self.bands}, rows={self.rows}")
            if self.bands * self.rows > self.num_perm:
                raise ValueError(f"bands * rows must be <= num_perm={self.num_perm}, got {self.bands}*{self.rows}")
        if self.fp_weight < 0 or self.fn_weight < 0 or self.fp_weight + self.fn_weight == 0:
            raise ValueError(f"fp_weight and fn_weight must be >= 0 and not both 0, got {self.fp_weight}, "
                             f"{self.fn_weight}")

    @property
    def banding(self) -> tuple[int, int]:
        """(bands, rows): the given ones, or the `optimal_banding` choice."""
        if self.bands is not None:
            return self.bands, self.rows
        return optimal_banding(self.threshold, self.num_perm, self.fp_weight, self.fn_weight)


# Shingles per step of the [num_perm, shingles] product: 2 x 512 KiB of working arrays for 128 permutations, which
# stay in cache (measured fastest of 256..2048) and bound memory for huge documents.
_TILE = 1024
# Text per `signatures` step. Batching amortises numpy's per-call overhead over short documents; much larger
# batches are slower again, their working arrays (~30 bytes per code point) falling out of cache.
_BATCH_CODE_POINTS = 1 << 17


@functools.cache
def _multipliers(num_perm: int, seed: int) -> np.ndarray:
    """The odd multiplier of every permutation, each repeated `_TILE` times: uint32[num_perm, _TILE]."""
    a = np.random.default_rng([seed, num_perm]).integers(0, 2**32, num_perm, dtype=np.uint32) | np.uint32(1)
    return np.repeat(a[:, None], _TILE, axis=1)


def _min_hash(hashes: np.ndarray, docs: np.ndarray, num_docs: int, config: MinHashConfig) -> np.ndarray:
    """uint32[num_docs, num_perm] signatures of shingles given as (hash, document index) pairs.

    Permutation k is multiplicative hashing, x -> a_k * x mod 2**32 with a_k odd (a bijection of the odd residues),
    of x = (the high 32 bits of h) | 1. Why this family:
    - The [num_perm, shingles] product is most of the work, so it runs in 32-bit lanes (half the traffic of a 64-bit
      multiply-shift) and in as few passes as possible: an affine a_k * x + b_k would add a fourth pass (copy,
      multiply, add, minimum) for no accuracy that the tests or the stdlib evaluation can measure, because the
      inputs are already mixed 64-bit hashes.
    - x is forced odd so that no input is a fixed point (0 would be every permutation's minimum). That and the
      truncation to 32 bits merge two shingles of one document with probability about m**2 / 2**32 (m shingles),
      which changes a signature only if the merged pair holds a minimum.
    """
    multipliers = _multipliers(config.num_perm, config.seed)
    # One sort of (document, x) drops repeated shingles before the product and groups each document's shingles.
    keys = _unique((docs.astype(_U64) << _U64(32)) | (hashes >> _U64(32)) | _U64(1))
    x, docs = keys.astype(np.uint32), (keys >> _U64(32)).astype(np.intp)
    out = np.full((num_docs, config.num_perm), _MAX32)
    if x.size == 0:
        return out
    # Segments are runs of one document inside one tile: minimum per segment per tile, then per document.
    tile_starts = np.arange(0, x.size, _TILE)
    bounds = np.union1d(np.flatnonzero(docs[1:] != docs[:-1]) + 1, tile_starts)
    local_bounds = bounds % _TILE  # every tile starts at a multiple of _TILE
    tile_bounds = np.searchsorted(bounds, np.append(tile_starts, x.size)).tolist()
    segment_min = np.empty((config.num_perm, bounds.size), np.uint32)
    buffer = np.empty((config.num_perm, min(_TILE, x.size)), np.uint32)
    for tile, start in enumerate(tile_starts.tolist()):
        chunk = x[start:start + _TILE]
        product = buffer[:, :chunk.size]
        # Copying the chunk into every row first makes both operands contiguous, which runs numpy's SIMD loops:
        # about twice as fast as broadcasting x[None, :] * a[:, None].
        product[...] = chunk
        np.multiply(product, multipliers[:, :chunk.size], out=product)
        lo, hi = tile_bounds[tile], tile_bounds[tile + 1]
        np.minimum.reduceat(product, local_bounds[lo:hi], axis=1, out=segment_min[:, lo:hi])
    segment_docs = docs[bounds]
    first = np.flatnonzero(np.append(True, segment_docs[1:] != segment_docs[:-1]))
    out[segment_docs[first]] = np.minimum.reduceat(segment_min, first, axis=1).T
    return out


def signature(hashes: np.ndarray, config: MinHashConfig = MinHashConfig()) -> np.ndarray:
    """MinHash signature (uint32[num_perm]) of a set of 64-bit shingle hashes; all 0xFFFFFFFF when empty."""
    hashes = np.asarray(hashes, _U64).ravel()
    return _min_hash(hashes, np.zeros(hashes.size, np.intp), 1, config)[0]


def signatures(texts, config: MinHashConfig = MinHashConfig()) -> np.ndarray:
    """uint32[len(texts), num_perm]: `signature(shingle_hashes(text))` per text, computed a batch of texts at a
    time. ASCII texts are batched apart from the others: one non-ASCII text would send a whole batch down the
    4-bytes-per-character path."""
    texts = list(texts)
    out = np.empty((len(texts), config.num_perm), np.uint32)
    order = sorted(range(len(texts)), key=lambda i: not texts[i].isascii())
    batch, size = [], 0
    for position, i in enumerate(order):
        batch.append(i)
        size += len(texts[i]) + 1
        last = position + 1 == len(order)
        if last or size >= _BATCH_CODE_POINTS or texts[i].isascii() != texts[order[position + 1]].isascii():
            hashes, docs = _document_shingles([texts[j] for j in batch], config.ngram)
            out[batch] = _min_hash(hashes, docs, len(batch), config)
            batch, size = [], 0
    return out


def is_empty_signature(sigs: np.ndarray) -> np.ndarray:
    """Whether each signature (last axis) is an empty document's: every row 0xFFFFFFFF."""
    return (np.asarray(sigs) == _MAX32).all(axis=-1)


def detection_probability(s, bands: int, rows: int):
    """P(a pair with Jaccard s shares at least one band) = 1 - (1 - s**rows)**bands."""
    return 1.0 - (1.0 - np.asarray(s, np.float64) ** rows) ** bands


@functools.cache
def optimal_banding(threshold: float, num_perm: int, fp_weight: float = 0.5,
                    fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising fp_weight * (area under P(s) for s < threshold) +
    fn_weight * (area under 1 - P(s) for s >= threshold), P = `detection_probability` (datasketch's criterion)."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    below = np.linspace(0.0, threshold, 1001)
    above = np.linspace(threshold, 1.0, 1001)
    b, r = pairs[:, :1], pairs[:, 1:]
    false_positive = np.trapezoid(detection_probability(below, b, r), below, axis=1)
    false_negative = np.trapezoid(1.0 - detection_probability(above, b, r), above, axis=1)
    best = np.argmin(fp_weight * false_positive + fn_weight * false_negative)
    return int(pairs[best, 0]), int(pairs[best, 1])


def banding_report(config: MinHashConfig = MinHashConfig()) -> str:
    bands, rows = config.banding
    probabilities = ", ".join(f"P({s})={detection_probability(s, bands, rows):.3f}" for s in (0.5, 0.6, 0.7, 0.8, 0.9))
    return (f"num_perm={config.num_perm} threshold={config.threshold}: bands={bands} rows={rows} "
            f"(uses {bands * rows} rows), effective threshold (1/b)^(1/r)={(1 / bands) ** (1 / rows):.3f}; "
            f"{probabilities}")


_BAND_SEEDS = _mix(np.arange(1, 4097, dtype=_U64) * _U64(0x9E3779B97F4A7C15))


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64[n, bands]: a 64-bit hash of each band's `rows` signature values, seeded by the band index (equal rows
    in different bands give different keys). Empty documents get key 0 in every band, which no real band takes:
    0 means "in no bucket", because empty documents must not all fall into one cluster."""
    sigs = np.asarray(sigs, np.uint32)
    if sigs.ndim != 2 or not 1 <= bands <= len(_BAND_SEEDS) or rows < 1 or bands * rows > sigs.shape[1]:
        raise ValueError(f"need a [n, >= bands*rows] signature matrix, 1 <= bands <= {len(_BAND_SEEDS)} and rows >= 1, "
                         f"got shape {sigs.shape} for bands={bands} rows={rows}")
    values = sigs[:, :bands * rows].reshape(len(sigs), bands, rows).astype(_U64)
    keys = np.broadcast_to(_BAND_SEEDS[:bands], (len(sigs), bands))
    for i in range(rows):  # a mixing chain over the rows, vectorised over documents and bands
        keys = _mix(keys ^ values[:, :, i])
    keys[keys == 0] = 1
    keys[is_empty_signature(sigs)] = 0
    return keys
