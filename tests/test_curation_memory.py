"""A corpus three times larger than a memory cap is curated under that cap: the pipeline streams.

The run is a subprocess on one worker, so every stage (reading, cleaning, safety, hashing, dedup, finalize, the
report) runs in the measured process. Its peak is `VmHWM`, the high-water mark of its own address space:
`ru_maxrss` would be wrong here, because a child forked from this (JAX-laden) test process starts with the
parent's resident set as its maximum.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from internlm2_jax.data.corpus import stdlib_corpus

CAP_MB = 120
CORPUS_MB = 3 * CAP_MB


def write_big_corpus(path, target_bytes):
    """Real stdlib modules with random assignments appended, repeated until `target_bytes`: real code, with near
    duplicates among copies of short modules (as in a real crawl)."""
    rng = np.random.default_rng(0)
    modules = [d.text for d in stdlib_corpus("train", max_bytes=4_000_000)]
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        i = 0
        while size < target_bytes:
            names = [f"name_{w}" for w in rng.integers(0, 1_000_000, 400)]
            suffix = "\n".join(f"{a} = {b}  # {c}" for a, b, c in zip(*[iter(names[:399])] * 3, strict=True))
            line = json.dumps({"text": f"{modules[i % len(modules)]}\n{suffix}\n", "id": f"d{i}"})
            f.write(line + "\n")
            size += len(line) + 1
            i += 1
    return i


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc/self/status")
def test_bounded_memory_on_a_corpus_three_times_the_cap(tmp_path):
    corpus = tmp_path / "big.jsonl"
    docs = write_big_corpus(corpus, CORPUS_MB << 20)
    script = textwrap.dedent(f"""
        import pathlib
        from internlm2_jax.data.curation.config import CurationConfig
        from internlm2_jax.data.curation.pipeline import run_local
        from internlm2_jax.data.curation.sources import InputConfig
        config = CurationConfig(inputs=(InputConfig({str(corpus)!r}, kind="code"),),
                                output_dir={str(tmp_path / 'out')!r}, num_workers=1, unit_bytes=16 << 20,
                                keep_removed_text=False, progress=False)
        result = run_local(config)
        print("DOCS", result.report["stages"][0]["docs_in"], result.report["output"]["docs"])
        status = pathlib.Path("/proc/self/status").read_text().splitlines()
        print("PEAK_MB", int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("DOCS", "PEAK_MB")))
    read, kept = map(int, lines["DOCS"].split())
    peak = float(lines["PEAK_MB"])
    print(f"{CORPUS_MB} MB corpus ({docs} documents, {kept} kept): peak RSS {peak:.0f} MB, cap {CAP_MB} MB")
    assert read == docs and kept > 0
    assert peak < CAP_MB
