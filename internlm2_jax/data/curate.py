"""Curate a corpus: `python -m internlm2_jax.data.curate --input jsonl:shards/ --input code:repos/ --output DIR`.

Inputs are `FORMAT:PATH` with FORMAT one of jsonl (a file, directory or glob of JSONL shards), code (a tree of source
files, first path component = repository) or text (a tree of text files), and an optional `@SOURCE` name. Every other
setting is a field of `CurationConfig`, changed with `--set` (e.g. `--set dedup.minhash.threshold=0.8`,
`--set quality.classifier=quality.npz --set num_workers=8`), or taken from a Python file defining `config()`.
`--runner beam` runs on Apache Beam (DirectRunner by default; pass e.g. `--beam-option=--runner=FlinkRunner`).
An output directory of an interrupted run with the same config is resumed where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys

from internlm2_jax.data.curation.config import CurationConfig
from internlm2_jax.data.curation.pipeline import OutputDirError
from internlm2_jax.data.curation.report import format_report
from internlm2_jax.data.curation.safety import BlocklistError
from internlm2_jax.data.curation.sources import FORMATS, InputConfig, InputError
from internlm2_jax.overrides import apply_overrides, to_dict


def parse_input(text: str) -> InputConfig:
    fmt, sep, rest = text.partition(":")
    if not sep or fmt not in FORMATS:
        raise argparse.ArgumentTypeError(f"--input {text!r}: expected FORMAT:PATH[@SOURCE] with FORMAT one of "
                                         f"{', '.join(FORMATS)}")
    path, _, source = rest.partition("@")
    if not path:
        raise argparse.ArgumentTypeError(f"--input {text!r}: the path is empty")
    return InputConfig(path=path, format=fmt, source=source)


def load_config(path: str | None) -> CurationConfig:
    if path is None:
        return CurationConfig()
    spec = importlib.util.spec_from_file_location("curation_config", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load a config from {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.config()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internlm2_jax.data.curate", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="a Python file whose config() returns a CurationConfig")
    parser.add_argument("--input", action="append", type=parse_input, default=[], metavar="FORMAT:PATH[@SOURCE]")
    parser.add_argument("--output", help="the output directory (config field output_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    parser.add_argument("--runner", choices=("local", "beam"), default="local")
    parser.add_argument("--beam-option", action="append", default=[], help="an Apache Beam pipeline option")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    if args.input:
        config = dataclasses.replace(config, inputs=config.inputs + tuple(args.input))
    if args.output:
        config = dataclasses.replace(config, output_dir=args.output)
    try:
        config = apply_overrides(config, args.set)
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(to_dict(config), indent=1, default=str))
    try:
        if args.runner == "beam":
            from internlm2_jax.data.curation.beam_runner import LOCAL_OPTIONS, run_beam

            result = run_beam(config, args.beam_option or LOCAL_OPTIONS)
        else:
            from internlm2_jax.data.curation.pipeline import run_local

            result = run_local(config)
    except (InputError, OutputDirError, BlocklistError, FileNotFoundError) as e:  # bad input: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n" + format_report(result.report))
    print(f"\nmanifest: {result.manifest}\nreport: {result.output_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
