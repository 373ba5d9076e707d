"""Fuzzy (MinHash LSH) and exact deduplication as plain numpy functions, shared by the single-machine runner and the
Apache Beam pipeline so that both find the same clusters.

Documents are identified by int64 keys, globally unique; in every cluster the smallest key is kept.

Fuzzy deduplication, in either runner:
1. a signature per document (`minhash.signatures`) and its band keys (`minhash.band_keys`; an empty document gets
   key 0 everywhere, which means "in no bucket", so empty documents are never clustered);
2. one bucket entry ((band, band key) -> document key) per band of every non-empty document;
3. per bucket (a GroupByKey in Beam), star edges from its smallest key to the other members, optionally kept only
   when the signatures agree on at least `threshold` of their rows (`bucket_edges`) or when the exact Jaccard of
   the two shingle sets reaches it (`exact_jaccard`);
4. the connected components of all edges, in one worker (`connected_components`): each key maps to the smallest key
   of its component, and every key that is not its own root is a duplicate.

`MinHashIndex` runs steps 2-4 in memory for a notebook's list of texts, with the same semantics (its vectorised edges
equal the union of `bucket_edges` over its buckets). `candidate_pairs` lists every pair sharing a bucket, for
evaluation only. Exact dedup groups documents by `content_hash` (`exact_groups`) and keeps each group's smallest key.
"""

from __future__ import annotations

import hashlib

import numpy as np

from internlm2_jax.data.curation.minhash import MinHashConfig, band_keys

DEFAULT_MAX_EDGES = 100_000_000


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values by sort and compare (np.unique hashes integers, which is much slower on millions of
    keys: benchmarks/RESULTS.md)."""
    values = np.sort(values)
    keep = np.ones(values.size, bool)
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _unique_pairs(pairs: np.ndarray, n: int) -> np.ndarray:
    """Distinct rows of an [P, 2] array of positions in [0, n), sorted."""
    codes = _sorted_unique(pairs[:, 0].astype(np.int64) * n + pairs[:, 1])
    return np.stack([codes // n, codes % n], axis=1)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature rows (last axis), the MinHash estimate of the Jaccard similarity."""
    return (np.asarray(a) == np.asarray(b)).mean(axis=-1)


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard similarity of two sets of distinct shingle hashes (`minhash.shingle_hashes`); 0 for two empty."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return inter / union if union else 0.0


def _entries(keys, band_keys_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(keys, then per bucket membership: document position, band, band key), band key 0 (empty documents) left out."""
    keys = np.asarray(keys, np.int64)
    band_keys_matrix = np.asarray(band_keys_matrix, np.uint64)
    if band_keys_matrix.ndim != 2 or band_keys_matrix.shape[0] != keys.size:
        raise ValueError(f"band_keys_matrix must be [len(keys)={keys.size}, bands], got {band_keys_matrix.shape}")
    position, band = np.nonzero(band_keys_matrix)
    return keys, position, band, band_keys_matrix[position, band]


def bucket_edges(keys_in_bucket, signatures_by_key=None,
                 verify_threshold: float | None = None) -> list[tuple[int, int]]:
    """Edges (smallest key, other key) contributed by one bucket.

    A star from the smallest member to every other member has the same connected components as all pairs of the
    bucket (every member is reachable through the star's centre) with len - 1 edges instead of len * (len - 1) / 2:
    a bucket of near-identical boilerplate pages can hold millions of documents.

    With `verify_threshold`, an edge is kept only when the two signatures (`signatures_by_key[key]`) agree on at least
    that fraction of rows, which removes the LSH false positives. That is an approximation of the verified all-pairs
    graph: two members that are similar to each other but not to the centre get no edge from this bucket (they
    usually share another bucket).
    """
    keys = _sorted_unique(np.asarray(keys_in_bucket, np.int64))
    if keys.size < 2:
        return []
    root, others = keys[0], keys[1:]
    if verify_threshold is not None:
        if signatures_by_key is None:
            raise ValueError("verify_threshold needs signatures_by_key")
        member_signatures = np.stack([np.asarray(signatures_by_key[int(key)]) for key in others])
        others = others[estimated_jaccard(member_signatures, np.asarray(signatures_by_key[int(root)]))
                        >= verify_threshold]
    return [(int(root), int(key)) for key in others]


def _bucket_runs(band: np.ndarray, band_key: np.ndarray, doc_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, run start of each sorted entry): entries sorted by (band, band key, document key), and for each the
    position in `order` where its bucket starts."""
    order = np.lexsort((doc_key, band_key, band))
    band, band_key = band[order], band_key[order]
    new_bucket = np.ones(order.size, bool)
    new_bucket[1:] = (band[1:] != band[:-1]) | (band_key[1:] != band_key[:-1])
    return order, np.maximum.accumulate(np.where(new_bucket, np.arange(order.size), 0))


def _verified(pairs: np.ndarray, signatures: np.ndarray, threshold: float, chunk: int = 1 << 12) -> np.ndarray:
    """Mask of the position pairs whose signatures agree on >= threshold of their rows, in chunks of 4096 pairs
    (4 MB of gathered signatures: bounded memory however many candidates there are)."""
    keep = np.empty(len(pairs), bool)
    for start in range(0, len(pairs), chunk):
        a, b = pairs[start:start + chunk, 0], pairs[start:start + chunk, 1]
        keep[start:start + chunk] = estimated_jaccard(signatures[a], signatures[b]) >= threshold
    return keep


def star_edges(keys, band_keys_matrix: np.ndarray, signatures: np.ndarray | None = None,
               verify_threshold: float | None = None) -> np.ndarray:
    """int64[E, 2], distinct and sorted: the union of `bucket_edges` over every bucket of these documents,
    vectorised (`signatures` row i belongs to keys[i])."""
    keys, position, band, band_key = _entries(keys, band_keys_matrix)
    order, run_start = _bucket_runs(band, band_key, keys[position])
    member = np.flatnonzero(run_start != np.arange(order.size))  # every sorted entry but its bucket's smallest
    pairs = np.stack([position[order[run_start[member]]], position[order[member]]], axis=1)
    if verify_threshold is not None:
        if signatures is None:
            raise ValueError("verify_threshold needs signatures")
        pairs = pairs[_verified(pairs, np.asarray(signatures), verify_threshold)]
    edges = keys[_unique_pairs(pairs, keys.size)]
    return edges[np.lexsort((edges[:, 1], edges[:, 0]))]


def candidate_pairs(keys, band_keys_matrix: np.ndarray, signatures: np.ndarray | None = None,
                    verify_threshold: float | None = None) -> set[tuple[int, int]]:
    """Every pair (a, b), a < b, sharing at least one bucket, optionally kept only when the signatures agree on >=
    `verify_threshold` of their rows. For evaluation: quadratic in the size of each bucket."""
    keys, position, band, band_key = _entries(keys, band_keys_matrix)
    order, run_start = _bucket_runs(band, band_key, keys[position])
    starts = np.flatnonzero(run_start == np.arange(order.size))
    sizes = np.diff(np.append(starts, order.size))
    chunks = [np.empty((0, 2), np.int64)]
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):  # one iteration per shared bucket
        first, second = np.triu_indices(size, 1)
        members = position[order[start:start + size]]
        chunks.append(np.stack([members[first], members[second]], axis=1))
    pairs = _unique_pairs(np.concatenate(chunks), keys.size)
    if verify_threshold is not None:
        if signatures is None:
            raise ValueError("verify_threshold needs signatures")
        pairs = pairs[_verified(pairs, np.asarray(signatures), verify_threshold)]
    pair_keys = np.sort(keys[pairs], axis=1)
    return {(int(a), int(b)) for a, b in pair_keys}


def connected_components(edges, keys, *, max_edges: int = DEFAULT_MAX_EDGES) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct keys, root of each): the root is the smallest key of the key's connected component, so the
    result does not depend on the order of the edges or of the keys.

    Vectorised union-find: every round hooks the larger root of each edge under the smaller one (the minimum over all
    edges hooking it), then compresses every path by pointer jumping, and drops the edges inside one component.
    It runs in one worker's memory, about 60 bytes per edge at peak on top of the int64 edge array (measured): the
    default limit of 100M edges (~8 GB in all) fails fast with ValueError instead of running out of memory. Past it,
    shard the problem or raise `max_edges` on a bigger worker.
    """
    if len(edges) > max_edges:
        raise ValueError(f"{len(edges)} edges is over max_edges={max_edges} (about 80 bytes per edge in one worker)")
    keys = _sorted_unique(np.asarray(keys, np.int64).ravel())
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    index = np.int32 if keys.size < 2**31 else np.int64  # positions in keys: int32 halves the working set
    # Binary searches of sorted endpoints walk the keys in order: several times faster than random probes.
    endpoints = edges.ravel()
    order = np.argsort(endpoints)
    found = np.empty(endpoints.size, index)
    found[order] = np.searchsorted(keys, endpoints[order])
    del order
    known = found < keys.size
    known[known] = keys[found[known]] == endpoints[known]
    if not known.all():
        raise ValueError(f"edge {tuple(edges[np.flatnonzero(~known)[0] // 2])} has an endpoint that is not in keys")
    u, v = found[0::2], found[1::2]
    parent = np.arange(keys.size, dtype=index)
    while True:
        pu, pv = parent[u], parent[v]
        across = pu != pv
        if not across.any():
            break
        u, v, pu, pv = u[across], v[across], pu[across], pv[across]
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))  # parent[x] <= x: no cycles
        while True:
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent
    return keys, keys[parent]


class MinHashIndex:
    """Single-machine fuzzy deduplication: `add` documents' signatures in batches, then read `clusters()`.

    Keeps, per document, its key (8 bytes), band keys (8 * bands) and, when verifying, its signature (4 * num_perm):
    about 670 bytes for 128 permutations in 18 bands, so ~6.7 GB for 10M documents. Edges are star edges verified at
    `config.threshold` (see `bucket_edges`), the same as a distributed run with the same config.
    """

    def __init__(self, config: MinHashConfig | None = None, *, verify: bool = True):
        self.config, self.verify = config or MinHashConfig(), verify
        self.bands, self.rows = self.config.banding
        self._keys: list[np.ndarray] = []
        self._band_keys: list[np.ndarray] = []
        self._signatures: list[np.ndarray] = []

    def add(self, keys, signatures: np.ndarray) -> None:
        keys = np.asarray(keys, np.int64).ravel()
        signatures = np.asarray(signatures, np.uint32)
        if signatures.shape != (keys.size, self.config.num_perm):
            raise ValueError(f"signatures must be [len(keys)={keys.size}, num_perm={self.config.num_perm}], "
                             f"got {signatures.shape}")
        self._keys.append(keys)
        self._band_keys.append(band_keys(signatures, self.bands, self.rows))
        if self.verify:
            self._signatures.append(signatures)

    def __len__(self) -> int:
        return sum(keys.size for keys in self._keys)

    def _all_keys(self) -> np.ndarray:
        return np.concatenate(self._keys) if self._keys else np.empty(0, np.int64)

    def edges(self) -> np.ndarray:
        """int64[E, 2]: the verified star edges of every bucket (`star_edges`)."""
        keys = self._all_keys()
        if _sorted_unique(keys).size != keys.size:
            raise ValueError("document keys must be unique")
        matrix = np.concatenate(self._band_keys) if self._band_keys else np.empty((0, self.bands), np.uint64)
        if not self.verify:
            return star_edges(keys, matrix)
        return star_edges(keys, matrix, np.concatenate(self._signatures), self.config.threshold)

    def clusters(self) -> dict[int, int]:
        """Every added key -> the smallest key of its cluster (itself when it has no near-duplicate)."""
        keys, roots = connected_components(self.edges(), self._all_keys())
        return dict(zip(keys.tolist(), roots.tolist(), strict=True))

    def duplicates(self) -> set[int]:
        """Keys to drop: those that are not the smallest key of their cluster."""
        return {key for key, root in self.clusters().items() if key != root}


def content_hash(text: str) -> str:
    """Hex digest of the exact UTF-8 text (BLAKE2b, 128 bits: collisions are out of reach for any corpus size)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def exact_groups(keys: np.ndarray, hashes: np.ndarray) -> list[list[int]]:
    """Keys of documents with equal content hashes: groups of two or more, each sorted (its first is kept)."""
    keys, hashes = np.asarray(keys, np.int64), np.asarray(hashes)
    order = np.lexsort((keys, hashes))
    h, k = hashes[order], keys[order]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    ends = np.r_[starts[1:], len(h)]
    return [k[s:e].tolist() for s, e in zip(starts, ends, strict=True) if e - s > 1]
