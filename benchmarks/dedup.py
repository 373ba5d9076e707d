"""Fuzzy deduplication throughput: our vectorised MinHash LSH against datasketch, on the Python stdlib corpus.

Both find the near-duplicate pairs (Jaccard >= 0.7 over word 5-gram shingles, 128 permutations) of the same raw
`.py` files (tests included, hash order, up to --max-mb of UTF-8), in the same process, back to back:
- ours: `signatures` (tokenise, shingle, hash, permute: all vectorised), `band_keys`, then `candidate_pairs` with
  every candidate verified by its estimated Jaccard;
- datasketch: the distinct reference `shingles()` strings (repeats would only cost it more hashing), `MinHash.bulk`
  (its fastest path: update_batch per document),
  `MinHashLSH` insert of every document then a query per document (its default banding for threshold 0.7).
Each stage is the median of --repeats runs after a warm-up. Usage: python benchmarks/dedup.py [--max-mb 32]
[--repeats 3]
"""

import argparse
import os
import platform

import numpy as np
from bench_common import median_seconds

from internlm2_jax.data.corpus import stdlib_files, stdlib_root
from internlm2_jax.data.curation.dedup import candidate_pairs
from internlm2_jax.data.curation.minhash import MinHashConfig, band_keys, shingles, signatures


def load_corpus(max_bytes: int) -> list[str]:
    root, texts, total = stdlib_root(), [], 0
    for name in stdlib_files(include_tests=True):
        try:
            text = (root / name).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        size = len(text.encode("utf-8"))
        if total + size <= max_bytes:
            texts.append(text)
            total += size
    return texts


def ours(texts: list[str], config: MinHashConfig, runs: int) -> tuple[float, float, int]:
    bands, rows = config.banding
    keys = np.arange(len(texts))
    sigs = signatures(texts, config)

    def lsh():
        return candidate_pairs(keys, band_keys(sigs, bands, rows), sigs, config.threshold)

    return median_seconds(lambda: signatures(texts, config), runs), median_seconds(lsh, runs), len(lsh())


def datasketch_run(texts: list[str], config: MinHashConfig, runs: int) -> tuple[float, float, int, tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    def minhashes():  # `bulk` is datasketch's fastest documented path: it reuses the permutations
        distinct = ({shingle.encode("utf-8") for shingle in shingles(text, config.ngram)} for text in texts)
        return MinHash.bulk(distinct, num_perm=config.num_perm)

    hashed = minhashes()

    def lsh():
        index = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
        for i, minhash in enumerate(hashed):
            index.insert(i, minhash)
        return {(min(i, j), max(i, j)) for i, minhash in enumerate(hashed) for j in index.query(minhash) if j != i}

    banding = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
    return median_seconds(minhashes, runs), median_seconds(lsh, runs), len(lsh()), (banding.b, banding.r)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-mb", type=float, default=32.0, help="UTF-8 megabytes of stdlib source (32: all)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    texts = load_corpus(int(args.max_mb * 1e6))
    mb = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    config = MinHashConfig()
    rows = [("datasketch 2.0 (baseline)",) + datasketch_run(texts, config, args.repeats),
            ("ours (numpy, verified)",) + ours(texts, config, args.repeats) + (config.banding,)]
    baseline = rows[0][1] + rows[0][2]
    print(f"fuzzy dedup, {len(texts)} stdlib files, {mb:.1f} MB, {platform.machine()}, {os.cpu_count()} cores, "
          f"median of {args.repeats}")
    print("| implementation | bands x rows | signatures s | LSH s | total s | MB/s | docs/s | pairs | vs datasketch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, sign, lsh, pairs, (bands, band_rows) in rows:
        total = sign + lsh
        print(f"| {name} | {bands} x {band_rows} | {sign:.3f} | {lsh:.3f} | {total:.3f} | {mb / total:.1f} | "
              f"{len(texts) / total:.0f} | {pairs} | {baseline / total:.1f}x |")
    empty = sum(not shingles(text) for text in texts)
    print(f"datasketch's pairs include the {empty * (empty - 1) // 2} pairs of the {empty} files without a shingle "
          "(their all-max signatures collide); ours never pairs empty documents.")


if __name__ == "__main__":
    main()
