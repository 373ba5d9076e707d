"""Data formats: how an experiment's `data` config becomes batches, found by `data.format` in a registry.

A format is a factory `(experiment, tokenizer) -> (training iterator, held-out batches factory or None, data hash)`
plus the rows it gives (`objectives.ROWS`), which the experiment checks against its objective's. The built-ins
register themselves here as an experiment file registers its own:

- `pretrain`: the data manifest (`data.manifest`, `data.heldout_manifest`) packed as `<s> text </s>` documents;
- `messages` / `alpaca`: SFT JSONL (`data.train_files` with optional `data.train_weights`, `data.heldout_files`),
  loss on assistant tokens;
- `pairs`: preference JSONL (the same fields), rendered for a reward model or a policy as the objective's rows ask.

An iterator is what `train.loop.train` consumes: `next()` gives a dict of numpy arrays (this process's rows), and
`get_state` / `set_state` / `stats` make it resumable and reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from internlm2_jax.train.objectives import ROWS
from internlm2_jax.train.registry import Registry

# An `internlm2_jax.experiment.Experiment`: named, not imported, since the schema imports this registry to check
# `data.format` (the floors allow no cycle, type-only imports included).
Experiment = Any
Built = tuple[Any, Callable[[], Iterator[dict]] | None, str]


@dataclasses.dataclass(frozen=True)
class DataFormat:
    factory: Callable[[Experiment, Any], Built]
    rows: tuple[str, ...]  # the objective rows it can give


DATA_FORMATS = Registry("data format")


def register_data_format(name: str, factory: Callable[[Experiment, Any], Built],
                         rows: Sequence[str] = ("text",)) -> Callable[[Experiment, Any], Built]:
    """Makes `data.format=name` build its data with `factory(experiment, tokenizer)`, for objectives whose
    `Objective.rows` is one of `rows`."""
    unknown = [r for r in rows if r not in ROWS]
    if not rows or unknown:
        raise ValueError(f"data format {name!r}: rows must be some of {ROWS}, got {tuple(rows)}")
    DATA_FORMATS.register(name, DataFormat(factory, tuple(rows)))
    return factory


def data_format(name: str) -> DataFormat:
    return DATA_FORMATS.get(name)


def data_iterators(exp: Experiment, tokenizer) -> Built:
    """(training iterator, held-out batches factory or None, data hash) for the experiment's data format."""
    return data_format(exp.data.format).factory(exp, tokenizer)


# ---- helpers for factories -----------------------------------------------------------------------------------------

def host_rows(exp: Experiment) -> tuple[int, dict[str, int]]:
    """(rows of the global batch this process reads, the iterators' `process_index` / `process_count`)."""
    processes = jax.process_count()
    if exp.train.batch_size % processes:
        raise ValueError(f"train.batch_size={exp.train.batch_size} must divide over {processes} processes")
    return exp.train.batch_size // processes, dict(process_index=jax.process_index(), process_count=processes)


def heldout_batches(exp: Experiment, make: Callable[..., Iterator[dict]], source) -> Callable[[], Iterator[dict]]:
    """The held-out factory: each call one unshuffled pass of `make(source, ...)`, cut at `data.eval_batches`. The
    iterator is made once (its files opened and indexed once, here: a bad path fails before training) and rewound
    to its start for every pass."""
    iterator = make(source, seed=0, shuffle=False, repeat=False)
    start = iterator.get_state()

    def batches():
        iterator.set_state(start)
        for i, batch in enumerate(iterator):
            if i >= exp.data.eval_batches:
                break
            yield batch

    return batches


def _jsonl_files(exp: Experiment) -> tuple[Sequence[str], Sequence[str] | None]:
    if not exp.data.train_files:
        raise ValueError(f"data.format={exp.data.format!r} needs data.train_files (JSONL paths)")
    return exp.data.train_files, exp.data.heldout_files or None


def _build(exp: Experiment, make: Callable[..., Any], train_source, heldout_source,
           **train_options) -> tuple[Any, Any]:
    train = make(train_source, seed=exp.train.seed, strict=exp.data.strict, **train_options)
    return train, (heldout_batches(exp, make, heldout_source) if heldout_source is not None else None)


# ---- the built-in formats ------------------------------------------------------------------------------------------

def pretrain_data(exp: Experiment, tokenizer) -> Built:
    from internlm2_jax.data import PretrainDataIterator, load_manifest

    rows, processes = host_rows(exp)
    manifest = load_manifest(exp.data.manifest)
    heldout = load_manifest(exp.data.heldout_manifest) if exp.data.heldout_manifest else None  # fail early

    def make(source, **options):
        return PretrainDataIterator(source, tokenizer, exp.train.seq_len, rows, **processes, **options)

    return (*_build(exp, make, manifest, heldout), manifest.hash)


def sft_data(exp: Experiment, tokenizer) -> Built:
    from internlm2_jax.data import SFTDataIterator

    rows, processes = host_rows(exp)
    train_files, heldout_files = _jsonl_files(exp)

    def make(source, **options):
        return SFTDataIterator(source, tokenizer, exp.train.seq_len, rows, format=exp.data.format, **processes,
                               **options)

    train, heldout = _build(exp, make, train_files, heldout_files, weights=exp.data.train_weights or None)
    return train, heldout, train.data_sha256


# PairDataIterator's names for the two renderings of a preference pair.
_PAIR_KINDS = {"reward_pairs": "reward", "policy_pairs": "dpo"}


def pair_data(exp: Experiment, tokenizer) -> Built:
    from internlm2_jax.data import PairDataIterator

    rows, processes = host_rows(exp)
    train_files, heldout_files = _jsonl_files(exp)
    kind = _PAIR_KINDS[exp.objective.build().rows]

    def make(source, **options):
        return PairDataIterator(source, tokenizer, exp.train.seq_len, rows, kind=kind, max_pairs=exp.data.max_pairs,
                                default_domain=exp.data.default_domain, **processes, **options)

    train, heldout = _build(exp, make, train_files, heldout_files, weights=exp.data.train_weights or None)
    return train, heldout, train.data_sha256


register_data_format("pretrain", pretrain_data)
register_data_format("messages", sft_data)
register_data_format("alpaca", sft_data)
register_data_format("pairs", pair_data, rows=("reward_pairs", "policy_pairs"))
