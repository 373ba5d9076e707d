"""The long-context mixture (`recipes.long_context_data`, `recipes.long_context_stdlib`) on a few stdlib packages:
repository documents in import order, long documents selected and up-weighted, the replay share, loading and packing
through `PretrainDataIterator`, and clear errors for bad settings. One curation run (seconds) serves every test."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from internlm2_jax.data import PretrainDataIterator, load_manifest
from internlm2_jax.recipes.long_context_data import (
    LongContextMixConfig,
    build_long_context_manifest,
    format_report,
)
from internlm2_jax.recipes.long_context_stdlib import build_stdlib_long_context, main, stage_stdlib_tree

# Packages with import structure and without import cycles (logging, wsgiref, http), one with a cycle (json:
# __init__ <-> decoder), and a one-file module (textwrap: an ordinary document, never a repository).
PACKAGES = ("json", "logging", "wsgiref", "http", "textwrap")
THRESHOLD = 2048  # tokens of the small tokenizer below: both long and short documents exist in this slice
CONFIG = LongContextMixConfig(long_threshold=THRESHOLD, long_upweight=3.0, repository_upweight=1.5, replay_share=0.3)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("long_context")
    result = build_stdlib_long_context(out, CONFIG, vocab_size=2000, packages=PACKAGES, num_workers=1,
                                       progress=False, log=lambda _: None)
    from internlm2_jax.tokenizer import Tokenizer

    return out, result, Tokenizer.from_file(out / "tokenizer.model")


def _records(manifest, shard):
    with open(manifest.resolve(shard), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _by_role(manifest, role):
    return [s for s in manifest.shards if s.path.startswith(f"long_context/{role}/")]


def _tokens(tokenizer, text):
    return len(tokenizer.encode(text, allow_special=False))


def test_repository_documents_keep_import_order(built):
    out, _, _ = built
    manifest = load_manifest(out / "manifest.json")
    repos = {r["id"]: r for s in _by_role(manifest, "repositories") for r in _records(manifest, s)}
    # One document per package with at least two files; the one-file module is no repository.
    assert set(repos) == {"json", "logging", "wsgiref", "http"}
    order = {name: r["meta"]["files"] for name, r in repos.items()}
    position = {name: {path: i for i, path in enumerate(files)} for name, files in order.items()}
    # Each module after the modules it imports, read off the stdlib sources themselves:
    # logging.handlers and logging.config `import logging`; logging.config imports logging.handlers;
    # wsgiref.handlers imports .util and .headers; wsgiref.simple_server imports wsgiref.handlers;
    # http.client imports http (the package) and email, http.server imports http.client.
    for repo, before, after in [("logging", "__init__.py", "handlers.py"), ("logging", "handlers.py", "config.py"),
                                ("wsgiref", "util.py", "handlers.py"), ("wsgiref", "headers.py", "handlers.py"),
                                ("wsgiref", "handlers.py", "simple_server.py"), ("http", "__init__.py", "client.py"),
                                ("http", "client.py", "server.py")]:
        first, then = position[repo][f"{repo}/{before}"], position[repo][f"{repo}/{after}"]
        assert first < then, (repo, before, after, order[repo])
    # The document's text holds the files in that order, as Markdown sections.
    for name, record in repos.items():
        sections = re.findall(r"^## (\S+)$", record["text"], re.MULTILINE)
        assert sections == order[name]


def test_long_documents_selected_by_threshold_and_upweighted(built):
    out, result, tokenizer = built
    curated = load_manifest(out / "curated" / "manifest.json")
    manifest = load_manifest(out / "manifest.json")
    expected_long = sum(_tokens(tokenizer, r["text"]) >= THRESHOLD for s in curated.shards
                        for r in _records(curated, s))
    long_shards = _by_role(manifest, "long")
    assert expected_long > 0 and long_shards
    assert sum(len(_records(manifest, s)) for s in long_shards) == expected_long
    for s in long_shards:
        assert all(_tokens(tokenizer, r["text"]) >= THRESHOLD for r in _records(manifest, s))
    for s in _by_role(manifest, "replay"):
        assert all(_tokens(tokenizer, r["text"]) < THRESHOLD for r in _records(manifest, s))
    # Weights: the curated epochs times the configured factor, and weight = epochs x documents.
    curated_epochs = {s.tier: s.epochs for s in curated.shards}
    repo_curated = load_manifest(out / "curated" / "manifest_repositories.json").shards[0].epochs
    for s in long_shards:
        assert s.source == "python-stdlib-long"
        assert s.epochs == pytest.approx(curated_epochs[s.tier] * CONFIG.long_upweight)
        assert s.weight == pytest.approx(s.epochs * len(_records(manifest, s)))
    for s in _by_role(manifest, "repositories"):
        assert s.epochs == pytest.approx(repo_curated * CONFIG.repository_upweight)
    assert result.role_stats("long").documents == expected_long


def test_replay_share_is_respected(built):
    out, result, tokenizer = built
    manifest = load_manifest(out / "manifest.json")
    round_tokens = {role: sum(s.epochs * s.num_tokens for s in _by_role(manifest, role))
                    for role in ("repositories", "long", "replay")}
    assert round_tokens["replay"] / sum(round_tokens.values()) == pytest.approx(CONFIG.replay_share)
    assert result.round_units("replay") / result.round_units() == pytest.approx(CONFIG.replay_share)
    # What the iterator actually draws over one round (quotas are rounded and every document adds <s> </s>).
    it = PretrainDataIterator(manifest, tokenizer, 4096, 8, repeat=False)
    for _ in it:
        pass
    drawn = it.stats["document_tokens_by_source"]
    assert drawn["python-stdlib-replay"] / sum(drawn.values()) == pytest.approx(CONFIG.replay_share, abs=0.02)
    report = json.loads((out / "long_context_report.json").read_text())
    assert report["roles"]["replay"]["round_share"] == pytest.approx(CONFIG.replay_share)
    assert "replay" in format_report(result)


def test_loads_through_the_iterator_and_packs_long_rows(built):
    out, result, tokenizer = built
    seq_len = 16384
    it = PretrainDataIterator(out / "manifest.json", tokenizer, seq_len, 2, seed=3)
    batch = next(it)
    assert batch["input_ids"].shape == (2, seq_len)
    assert (batch["segment_ids"] > 0).all()  # packed full: sequential packing pads only at the end of the data
    # Some document piece in these rows is longer than a phase-1 row: the rows really hold long context.
    longest = max(int(np.bincount(row).max()) for row in batch["segment_ids"])
    assert longest > 4096
    assert result.role_stats("repositories").longest > 4096


def test_replay_share_zero_writes_no_short_data(built, tmp_path):
    out, _, tokenizer = built
    config = dataclasses.replace(CONFIG, replay_share=0.0)
    result = build_long_context_manifest(out / "curated/manifest.json", out / "curated/manifest_repositories.json",
                                         tmp_path, config, tokenizer=tokenizer, progress=False)
    manifest = load_manifest(result.manifest)
    assert not _by_role(manifest, "replay") and not (tmp_path / "long_context" / "replay").exists()


def test_byte_threshold_needs_no_tokenizer(built, tmp_path):
    out, _, _ = built
    config = LongContextMixConfig(long_threshold=20_000, length_unit="bytes")
    result = build_long_context_manifest(out / "curated/manifest.json", out / "curated/manifest_repositories.json",
                                         tmp_path, config, progress=False)
    manifest = load_manifest(result.manifest)
    for s in _by_role(manifest, "long"):
        assert s.num_tokens is None
        assert all(len(r["text"].encode()) >= 20_000 for r in _records(manifest, s))


@pytest.mark.parametrize("field, value, message", [
    ("long_upweight", -1.0, "LongContextMixConfig.long_upweight"),
    ("repository_upweight", 0.0, "LongContextMixConfig.repository_upweight"),
    ("long_threshold", 0, "LongContextMixConfig.long_threshold"),
    ("long_threshold", -5, "LongContextMixConfig.long_threshold"),
    ("replay_share", -0.1, "LongContextMixConfig.replay_share"),
    ("replay_share", 1.0, "LongContextMixConfig.replay_share"),
    ("length_unit", "words", "LongContextMixConfig.length_unit"),
    ("min_repository_files", 0, "LongContextMixConfig.min_repository_files"),
])
def test_bad_config_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LongContextMixConfig(**{field: value})


def test_empty_or_missing_sources_name_the_field(built, tmp_path):
    out, _, tokenizer = built
    curated, repos = out / "curated/manifest.json", out / "curated/manifest_repositories.json"
    with pytest.raises(ValueError, match="repositories_manifest: .*repositories=True"):
        build_long_context_manifest(curated, None, tmp_path / "a", CONFIG, tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="curated_manifest"):
        build_long_context_manifest(tmp_path / "missing.json", repos, tmp_path / "b", CONFIG, tokenizer=tokenizer,
                                    progress=False)
    nothing_long = dataclasses.replace(CONFIG, long_threshold=10**9, min_repository_files=10**6)
    with pytest.raises(ValueError, match="long_threshold / min_repository_files"):
        build_long_context_manifest(curated, repos, tmp_path / "c", nothing_long, tokenizer=tokenizer,
                                    progress=False)
    all_long = dataclasses.replace(CONFIG, long_threshold=1)
    with pytest.raises(ValueError, match="replay_share"):
        build_long_context_manifest(curated, repos, tmp_path / "d", all_long, tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        build_long_context_manifest(curated, repos, tmp_path / "e", CONFIG, progress=False)
    with pytest.raises(FileExistsError, match="out_dir"):
        build_long_context_manifest(curated, repos, out, CONFIG, tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="packages"):
        stage_stdlib_tree(tmp_path / "tree", ["no_such_package_xyz"])


def test_another_tokenizer_than_curation_counted_with_is_refused(built, tmp_path):
    out, _, tokenizer = built

    class Doubled:  # counts every token twice: the manifest's num_tokens no longer match
        def encode(self, text, *, allow_special=True):
            return tokenizer.encode(text, allow_special=allow_special) * 2

    with pytest.raises(ValueError, match="not the one the curation run counted with"):
        build_long_context_manifest(out / "curated/manifest.json", out / "curated/manifest_repositories.json",
                                    tmp_path, CONFIG, tokenizer=Doubled(), progress=False)


def test_cli_from_a_curation_run(built, tmp_path, capsys):
    out, _, _ = built
    assert main(["--out", str(tmp_path), "--curated", str(out / "curated"), "--tokenizer",
                 str(out / "tokenizer.model"), "--set", f"long_threshold={THRESHOLD}", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "repositories" in printed and ">32K" in printed
    assert Path(tmp_path / "manifest.json").is_file()
