"""The long-context mixture built on this machine from the Python standard library (a real code corpus everywhere).

    stdlib train split -> a code tree, one repository per top-level package -> (a tokenizer) -> curation with
    `repositories=True` -> `long_context_data.build_long_context_manifest`

    python -m internlm2_jax.recipes.long_context_stdlib --out data/internlm2_long_context \
        --tokenizer tokenizers/internlm2_tokenizer.model

writes `<out>/manifest.json` (what `experiments/internlm2_7b_long_context.py` reads), its shards under
`<out>/long_context/`, `<out>/long_context_report.json`, and the intermediate `<out>/stdlib_tree/` and `<out>/curated/`
(a rerun with the same settings resumes the curation). `--curated DIR` skips the stdlib and builds the mixture from
another curation run's `DIR/manifest.json` and `DIR/manifest_repositories.json` (curate with `--set repositories=true`).
Without `--tokenizer` a SentencePiece model of `--vocab-size` is trained on the tree (`<out>/tokenizer.model`); count
with the tokenizer the run trains with, since "long" is measured in its tokens.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from internlm2_jax.data.corpus import CorpusDocument, is_heldout, split_source, stdlib_files, stdlib_root
from internlm2_jax.data.curation import CurationConfig, InputConfig, run_local
from internlm2_jax.overrides import apply_overrides
from internlm2_jax.recipes.long_context_data import (
    DEFAULT_CONFIG,
    LongContextMixConfig,
    LongContextResult,
    build_long_context_manifest,
    format_report,
)
from internlm2_jax.tokenizer import Tokenizer, train_tokenizer

SOURCE = "python-stdlib"
HELDOUT_FRACTION = 0.05  # `stdlib_corpus`'s default: the demo's held-out files stay out of training here too


def stage_stdlib_tree(out_dir: str | Path, packages: Sequence[str] | None = None) -> Path:
    """Copies the stdlib's training-split `.py` files (tests excluded, as in `stdlib_corpus`) to
    `<out_dir>/<top-level name>/<stdlib path>`, so the curation pipeline reads one repository per top-level package
    or module (`repo_depth=1`).

    `packages`: top-level package or module names to keep (`"json"`, `"textwrap"`); None keeps all of them. The
    held-out files of `stdlib_corpus` are left out (file by file, a package keeps its other files), so the tiny runs'
    held-out split stays unseen. The tree is rebuilt from scratch each call.
    """
    out = Path(out_dir)
    root = stdlib_root()
    names = [n for n in stdlib_files() if not is_heldout(n, HELDOUT_FRACTION)]
    if packages is not None:
        wanted = set(packages)
        names = [n for n in names if n.split("/")[0].removesuffix(".py") in wanted]
        missing = wanted - {n.split("/")[0].removesuffix(".py") for n in names}
        if missing:
            raise ValueError(f"packages: no training-split stdlib files for {sorted(missing)} under {root}")
    if not names:
        raise ValueError(f"packages: no stdlib files selected under {root}")
    if out.exists():
        shutil.rmtree(out)
    for name in names:
        # `<package>/<package>/...`: a repository directory holding the package, as a checked-out project does, so
        # the paths within the repository are the package's import paths (`logging/config.py` is `logging.config`)
        # and absolute imports (`import logging.handlers`) find their files. A tree rooted at the package itself
        # would leave only the relative imports to order by.
        target = out / name.split("/")[0].removesuffix(".py") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, target)
    return out


def _tree_tokenizer(tree: Path, path: Path, vocab_size: int, sample_docs: int) -> Tokenizer:
    # Pieces of files (`split_source`), as the demo's tokenizer is trained: whole files would be cut by
    # SentencePiece's maximum sentence length anyway, and pieces spread a small sample over more of the library.
    files = (CorpusDocument(p.relative_to(tree).as_posix(), p.read_text(encoding="utf-8", errors="replace"))
             for p in sorted(tree.rglob("*.py")))
    pieces = (piece.text for doc in files for piece in split_source(doc))
    return train_tokenizer(itertools.islice(pieces, sample_docs), vocab_size, output_path=path)


def build_stdlib_long_context(out_dir: str | Path, config: LongContextMixConfig = DEFAULT_CONFIG, *,
                              tokenizer_path: str | Path | None = None, vocab_size: int = 8192,
                              tokenizer_docs: int = 3000, packages: Sequence[str] | None = None,
                              num_workers: int = 0, overwrite: bool = False, progress: bool = True,
                              log=print) -> LongContextResult:
    """The stdlib curated with `repositories=True` and turned into a long-context mixture under `out_dir`."""
    out = Path(out_dir)
    if (out / "manifest.json").exists() and not overwrite:  # before minutes of curation, not after
        raise FileExistsError(f"out_dir: {out} already holds a manifest.json; pass overwrite=True (--overwrite)")
    start = time.perf_counter()
    tree = stage_stdlib_tree(out / "stdlib_tree", packages)
    log(f"[{time.perf_counter() - start:6.1f}s] staged {sum(1 for _ in tree.rglob('*.py'))} files in {tree}")
    if tokenizer_path is None:
        tokenizer_path = out / "tokenizer.model"
        tokenizer = _tree_tokenizer(tree, Path(tokenizer_path), vocab_size, tokenizer_docs)
        log(f"[{time.perf_counter() - start:6.1f}s] trained a {vocab_size}-piece tokenizer: {tokenizer_path}")
    else:
        tokenizer = Tokenizer.from_file(tokenizer_path)
    curation = run_local(CurationConfig(
        inputs=(InputConfig(str(tree), format="code", source=SOURCE),), output_dir=str(out / "curated"),
        tokenizer=str(Path(tokenizer_path).resolve()), repositories=True, num_workers=num_workers, progress=progress,
        unit_bytes=1 << 20))  # ~12 units over the 11 MB library: work spreads over the cores
    log(f"[{time.perf_counter() - start:6.1f}s] curated: {curation.manifest}, {curation.repositories_manifest}")
    result = build_long_context_manifest(curation.manifest, curation.repositories_manifest, out, config,
                                         tokenizer=tokenizer, overwrite=overwrite, progress=progress)
    log(f"[{time.perf_counter() - start:6.1f}s] wrote {result.manifest}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internlm2_jax.recipes.long_context_stdlib",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the output directory (its manifest.json is the mixture)")
    parser.add_argument("--curated", help="use this curation run's manifests instead of curating the stdlib")
    parser.add_argument("--tokenizer", help="a SentencePiece model to count tokens with (default: train one)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="of the trained tokenizer")
    parser.add_argument("--packages", nargs="+", help="top-level stdlib packages or modules (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a LongContextMixConfig field, e.g. long_threshold=8192 or replay_share=0.3")
    parser.add_argument("--num-workers", type=int, default=0, help="curation processes (0: one per core)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier mixture in --out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = apply_overrides(LongContextMixConfig(), args.set)
    except ValueError as e:
        parser.error(str(e))
    if args.curated and args.tokenizer is None and config.length_unit == "tokens":
        parser.error("--curated needs --tokenizer (the one the curation counted with), or --set length_unit=bytes")
    try:
        if args.curated:
            curated = Path(args.curated)
            result = build_long_context_manifest(
                curated / "manifest.json", curated / "manifest_repositories.json", args.out, config,
                tokenizer=Tokenizer.from_file(args.tokenizer) if args.tokenizer else None, overwrite=args.overwrite,
                progress=not args.no_progress)
        else:
            result = build_stdlib_long_context(args.out, config, tokenizer_path=args.tokenizer,
                                               vocab_size=args.vocab_size, packages=args.packages,
                                               num_workers=args.num_workers, overwrite=args.overwrite,
                                               progress=not args.no_progress)
    except (ValueError, FileExistsError) as e:  # bad settings or inputs: the message names the field, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n" + format_report(result))
    print(f"\nmanifest: {result.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
