"""The curation pipeline end to end on one machine: stage accounting, quarantine, outputs, manifest, resume, CLI."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from curation_testing import write_corpus

from internlm2_jax.data.curation.config import CurationConfig, QualityConfig
from internlm2_jax.data.curation.pipeline import OutputDirError, run_local
from internlm2_jax.data.curation.quality import QualityClassifier, TierConfig
from internlm2_jax.data.curation.safety import SafetyConfig
from internlm2_jax.data.curation.sources import InputConfig, InputError
from internlm2_jax.data.manifest import load_manifest


def make_config(tmp_path, corpus, **changes) -> CurationConfig:
    lists = tmp_path / "lists"
    lists.mkdir(exist_ok=True)
    (lists / "domains.txt").write_text("# test list\ncasino-example.test\n")
    (lists / "words.txt").write_text("buy now\n")
    config = CurationConfig(
        inputs=(InputConfig(str(corpus["jsonl"]), "jsonl", source="web"),
                InputConfig(str(corpus["code"]), "code", source="code")),
        output_dir=str(tmp_path / "out"),
        safety=SafetyConfig(domain_blocklist=str(lists / "domains.txt"), word_blocklist=str(lists / "words.txt")),
        num_workers=1, progress=False)
    return dataclasses.replace(config, **changes)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def result(tmp_path_factory, corpus):
    return run_local(make_config(tmp_path_factory.mktemp("run"), corpus))


def read_jsonl(paths):
    return [json.loads(line) for p in sorted(paths) for line in p.read_text().splitlines()]


def stage(report, name):
    return next(s for s in report["stages"] if s["stage"] == name)


def test_every_record_is_accounted_for(result, corpus):
    report = result.report
    read = stage(report, "read")
    jsonl_lines = len(corpus["jsonl"].read_bytes().splitlines())
    code_files = sum(1 for p in corpus["code"].rglob("*.py"))
    assert read["docs_in"] == jsonl_lines + code_files
    assert read["removed_because"] == {"malformed_json": 1, "invalid_utf8": 2, "empty": 2, "missing_text_field": 1,
                                       "non_string_text": 1, "binary": 1}
    # Each stage takes exactly what the previous one let through, and the output is what the last one kept.
    for before, after in zip(report["stages"], report["stages"][1:], strict=False):
        assert after["docs_in"] == before["docs_out"], (before["stage"], after["stage"])
    assert report["output"]["docs"] == report["stages"][-1]["docs_out"]
    removed = read_jsonl((result.output_dir / "removed").glob("*.jsonl"))
    assert len(removed) == read["docs_in"] - report["output"]["docs"]
    bad = [r for r in removed if r["stage"] == "read"]
    assert any("caf\\xe9" in r["raw"] for r in bad), "invalid UTF-8 must be kept, escaped, in the quarantine"
    assert all(r["where"] and r["detail"] for r in bad)


def test_duplicates_safety_and_provenance(result):
    report = result.report
    assert stage(report, "exact_dedup")["removed_because"] == {"exact_duplicate": 2}  # a prose copy, a code copy
    assert stage(report, "fuzzy_dedup")["removed_because"] == {"near_duplicate": 1}
    assert stage(report, "safety")["docs_in"] - stage(report, "safety")["docs_out"] == 2  # spam words, domain
    removed = {r.get("id"): r for r in read_jsonl((result.output_dir / "removed").glob("*.jsonl"))}
    assert removed["exact-copy"]["duplicate_of"] == "prose-1"
    assert removed["near-copy"]["duplicate_of"] == "prose-0"
    assert removed["repo_a/json/decoder_copy.py"]["duplicate_of"] == "repo_a/json/decoder.py"
    kept = read_jsonl(result.output_dir.glob("shards/*/*/*.jsonl"))
    ids = {d["id"] for d in kept}
    assert {"prose-0", "prose-1", "repo_a/json/decoder.py"} <= ids
    assert not ids & {"exact-copy", "near-copy", "spam", "blocked-site"}
    prose = next(d for d in kept if d["id"] == "prose-0")
    assert prose["meta"]["url"] == "https://news.example.org/0"
    assert prose["meta"]["provenance"].endswith("web.jsonl:1")
    assert prose["meta"]["curation"]["quality"]["tier"] == "default"


def test_manifest_lists_the_shards(result):
    manifest = load_manifest(result.manifest)
    assert {s.source for s in manifest.shards} == {"web", "code"}
    docs = sum(len(manifest.resolve(s).read_text().splitlines()) for s in manifest.shards)
    assert docs == result.report["output"]["docs"]
    assert all(s.epochs == 1.0 and s.weight == len(manifest.resolve(s).read_text().splitlines())
               for s in manifest.shards)
    assert (result.output_dir / "report.md").read_text().count("| clean |") == 1
    assert (result.output_dir / "lsh_detection_curve.png").stat().st_size > 10_000


def test_resume_skips_done_units_and_refuses_another_config(tmp_path, corpus):
    config = make_config(tmp_path, corpus)
    first = run_local(config)
    outputs = {p: p.read_bytes() for p in first.output_dir.rglob("*") if p.is_file()}
    # A run killed after the filter pass: finalize outputs and the dedup decision are gone.
    for p in first.output_dir.glob("work/finalized/*.json"):
        p.unlink()
    (first.output_dir / "work" / "dedup.json").unlink()
    filtered_mtimes = {p: p.stat().st_mtime_ns for p in first.output_dir.glob("work/filtered/*.json")}
    second = run_local(config)
    assert {p: p.stat().st_mtime_ns for p in second.output_dir.glob("work/filtered/*.json")} == filtered_mtimes
    assert {p: p.read_bytes() for p in second.output_dir.rglob("*") if p.is_file()} == outputs
    with pytest.raises(OutputDirError, match="another configuration"):
        run_local(dataclasses.replace(config, keep_removed_text=False))


def test_quality_tiers_weight_the_mixture(tmp_path, corpus):
    texts = [json.loads(line)["text"] for line in corpus["jsonl"].read_text(errors="replace").splitlines()[:5]]
    code = [p.read_text() for p in sorted(corpus["code"].rglob("*.py")) if p.name not in ("blob.py", "latin.py")]
    classifier = QualityClassifier.fit(code + texts, [1] * len(code) + [0] * len(texts), epochs=30, seed=0)
    classifier.save(tmp_path / "quality.npz")
    tiers = TierConfig(high_threshold=0.5, low_threshold=0.5)
    config = make_config(tmp_path, corpus, quality=QualityConfig(classifier=str(tmp_path / "quality.npz"),
                                                                 kinds=("code", "text"), tiers=tiers))
    result = run_local(config)
    rows = {(r["source"], r["tier"]): r for r in result.report["tiers"]}
    assert ("code", "high") in rows and rows[("code", "high")]["epochs"] == 2.0
    assert ("web", "low") not in rows, "low tier has weight 0: dropped"
    assert result.report["dropped_tiers"].get("tier_low", 0) >= 1
    manifest = load_manifest(result.manifest)
    high = [s for s in manifest.shards if s.tier == "high"]
    assert high and all(s.epochs == 2.0 for s in high)
    scored = read_jsonl(result.output_dir.glob("shards/code/high/*.jsonl"))
    assert all(d["meta"]["curation"]["quality"]["score"] >= 0.5 for d in scored)


def test_repository_documents_follow_imports(tmp_path, corpus):
    result = run_local(make_config(tmp_path, corpus, repositories=True))
    repos = read_jsonl(result.output_dir.glob("shards/code-repositories/long/*.jsonl"))
    by_repo = {d["id"]: d for d in repos}
    files = by_repo["repo_a"]["meta"]["files"]
    # json/__init__.py imports .encoder (and .decoder, which imports json back: a cycle, ordered by path).
    assert files.index("json/encoder.py") < files.index("json/__init__.py") < files.index("json/decoder.py")
    loose = by_repo["repo_b"]["meta"]["files"]
    assert loose.index("fnmatch.py") < loose.index("glob.py")  # glob imports fnmatch
    assert by_repo["repo_a"]["text"].startswith("# Repository: repo_a\n\n## json/")
    assert set(by_repo) == {"repo_a", "repo_b"}
    assert load_manifest(result.repositories_manifest).shards[0].tier == "long"


def test_bad_inputs_and_config_values_are_named(tmp_path, corpus):
    with pytest.raises(InputError, match=r"inputs\[0\].path"):
        run_local(make_config(tmp_path, corpus, inputs=(InputConfig(str(tmp_path / "missing.jsonl")),)))
    with pytest.raises(InputError, match=r"inputs\[0\].format"):
        run_local(make_config(tmp_path, corpus, inputs=(InputConfig(str(corpus["jsonl"]), "parquet"),)))
    with pytest.raises(ValueError, match=r"inputs\[1\].source: 'web' is also inputs\[0\]"):
        run_local(make_config(tmp_path, corpus, inputs=(InputConfig(str(corpus["jsonl"]), source="web"),
                                                         InputConfig(str(corpus["code"]), "code", source="web"))))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("not ours")
    with pytest.raises(OutputDirError, match="not a curation output"):
        run_local(make_config(tmp_path, corpus, output_dir=str(tmp_path / "junk")))


def test_cli(tmp_path, corpus):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "internlm2_jax.data.curate", "--input", f"jsonl:{corpus['jsonl']}@web",
           "--input", f"code:{corpus['code']}", "--output", str(out), "--set", "num_workers=2",
           "--set", "dedup.minhash.threshold=0.8"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| exact_dedup |" in done.stdout and "manifest:" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert stage(report, "read")["docs_in"] > 0
    assert np.isclose(json.loads((out / "work" / "config.json").read_text())["config"]["dedup"]["minhash"]
                      ["threshold"], 0.8)
    bad = subprocess.run(cmd[:-2] + ["--set", "dedup.minhash.threshold=2"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "threshold" in bad.stderr
    missing = subprocess.run(cmd[:3] + ["--input", f"jsonl:{corpus['jsonl']}.missing", "--output",
                                        str(tmp_path / "cli2")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "inputs[0].path: no JSONL file" in missing.stderr
    assert "Traceback" not in missing.stderr
