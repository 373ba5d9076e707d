"""Apache Beam (DirectRunner, several worker processes) and the single-machine runner write identical outputs."""

import dataclasses

import numpy as np
import pytest
from curation_testing import write_corpus

from internlm2_jax.data.corpus import stdlib_root
from internlm2_jax.data.curation.beam_runner import run_beam
from internlm2_jax.data.curation.cleaning import CleaningConfig
from internlm2_jax.data.curation.config import CurationConfig, DedupConfig
from internlm2_jax.data.curation.pipeline import run_local
from internlm2_jax.data.curation.sources import InputConfig

pytest.importorskip("apache_beam")


def outputs(directory):
    """Every final file (shards, removed, manifests) and the dedup decision; not timing-dependent work files."""
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*")
             if p.is_file() and p.parts[len(directory.parts)] in ("shards", "removed")}
    files["manifest.json"] = (directory / "manifest.json").read_text().encode()
    with np.load(directory / "work" / "dedup.npz") as data:
        dedup = {k: data[k].tolist() for k in data.files}
    return files, dedup


@pytest.mark.parametrize("verify", ["signature", "exact"])
def test_beam_and_local_runners_agree(tmp_path, verify):
    corpus = write_corpus(tmp_path / "corpus")
    config = CurationConfig(
        # The stdlib's codec tables (encodings/cp*.py) are a family of near-duplicates: real clusters to agree on.
        inputs=(InputConfig(str(corpus["jsonl"]), "jsonl", source="web"),
                InputConfig(str(stdlib_root() / "encodings"), "code", source="codecs")),
        code_cleaning=CleaningConfig.for_code().disable("max_generated_markers"), dedup=DedupConfig(verify=verify),
        unit_bytes=150_000, num_workers=2, progress=False)
    local = run_local(dataclasses.replace(config, output_dir=str(tmp_path / "local")))
    beam = run_beam(dataclasses.replace(config, output_dir=str(tmp_path / "beam")))
    assert local.report["units"] > 4
    local_files, local_dedup = outputs(local.output_dir)
    beam_files, beam_dedup = outputs(beam.output_dir)
    assert local_dedup == beam_dedup
    assert sorted(local_files) == sorted(beam_files)
    assert local_files == beam_files
    assert local.report == beam.report
    assert local.report["dedup"]["clusters"] >= 3 and local.report["dedup"]["near_duplicates"] >= 10
