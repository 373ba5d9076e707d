"""Orbax checkpoints of the training state, the data iterator's state and the run's provenance, in one step folder.

Saving is asynchronous (the step returns while the bytes are written). Restoring goes to the newest complete step;
if that step cannot be read (a crash mid-write on a file system without atomic renames, a deleted file) the previous
one is used, with a warning. A checkpoint whose model shape or schema differs from the run is refused with the
differing fields named: that is a configuration mistake, not a corrupt file, so no older step is tried.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import subprocess
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from internlm2_jax.config import ModelConfig

SCHEMA_VERSION = 2  # 2: the data state holds every process's iterator state
# Fields that decide parameter shapes or the parameter tree; the rest (rope_theta, dtype, remat, ...) may change
# between a run and its continuation, as in the 4K -> 32K long-context phase.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "bias", "tie_word_embeddings", "scan_layers", "param_dtype")
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "sentencepiece", "internlm2-jax")

log = logging.getLogger("internlm2_jax.checkpoint")


class CheckpointMismatch(ValueError):
    """The checkpoint belongs to a different model or schema; the message names what differs."""


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent, check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def provenance(**extra: Any) -> dict[str, Any]:
    """What every checkpoint records beside the state: schema version, git commit, package versions, plus `extra`
    (the resolved config, seeds, tokenizer hash, data-manifest hash)."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"schema_version": SCHEMA_VERSION, "git_commit": git_commit(), "packages": versions, **extra}


def check_compatible(saved: dict[str, Any], model: ModelConfig, where: str) -> None:
    if saved.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointMismatch(f"{where}: checkpoint schema version {saved.get('schema_version')} cannot be read "
                                 f"by this code (schema {SCHEMA_VERSION})")
    saved_model = saved.get("model") or {}
    current = dataclasses.asdict(model)
    differ = [f"{k}: checkpoint {saved_model.get(k)!r} vs run {current[k]!r}" for k in SHAPE_FIELDS
              if k in saved_model and saved_model[k] != current[k]]
    if differ:
        raise CheckpointMismatch(f"{where}: the checkpoint's model does not fit this run ({'; '.join(differ)})")


def all_process_states(state: dict) -> list[dict]:
    """Every process's data-iterator state, in process order (a collective: all processes must call it).

    Orbax writes JSON items from process 0 only, and each process reads its own part of the data, so process 0 must
    save all of them for a multi-host run to resume.
    """
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(gathered[i, : lengths[i]])) for i in range(len(lengths))]


class Checkpointer:
    """Save every `save_every` steps (and when forced), keep the newest `keep`, restore the newest readable one."""

    def __init__(self, directory: str | Path, *, save_every: int = 1000, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        # Save exactly every `save_every` steps (orbax would also save the first step of every run by default).
        options = ocp.CheckpointManagerOptions(should_save_fn=lambda step, _: step % save_every == 0,
                                               max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, *, data_state: dict, metadata: dict, force: bool = False) -> bool:
        """Starts saving (returns at once when async); False when `step` is not a save step and not forced."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave({"processes": all_process_states(data_state)}),
                                  meta=ocp.args.JsonSave(metadata))
        return self.manager.save(step, args=args, force=force)

    def restore_latest(self, abstract_state, model: ModelConfig):
        """(step, state, data_state, metadata) of the newest readable checkpoint, or None if there is none.

        `abstract_state` holds ShapeDtypeStructs with shardings: the state lands directly on this run's mesh,
        whatever mesh it was saved from.
        """
        for step in reversed(self.steps()):
            where = f"{self.directory}/{step}"
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous one
                warnings.warn(f"checkpoint {where} is unreadable ({type(e).__name__}: {e}); trying the previous one",
                              stacklevel=2)
                continue
            check_compatible(meta, model, where)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"checkpoint {where} is unreadable ({type(e).__name__}: {e}); trying the previous one",
                              stacklevel=2)
                continue
            states = restored["data"]["processes"]
            if len(states) != jax.process_count():
                raise CheckpointMismatch(f"{where}: saved by {len(states)} processes, resumed by "
                                         f"{jax.process_count()}; the data iterators cannot be re-split")
            log.info("restored %s", where)
            return step, restored["state"], states[jax.process_index()], meta
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def is_run_directory(path: str | Path) -> bool:
    return (Path(path) / "checkpoints").is_dir()


def run_tokenizer(meta: dict):
    """The tokenizer a run was trained with (from `load_run`'s metadata), if the file it names still exists."""
    from internlm2_jax.tokenizer import Tokenizer

    path = Path(meta.get("tokenizer_path") or "")
    if path.is_file():
        return Tokenizer.from_file(path)
    if path.is_dir():
        return Tokenizer.from_pretrained(path)
    return None


def load_run(run_dir: str | Path, *, mesh=None):
    """(model config, model, metadata) from the latest complete checkpoint of a run directory.

    The optimizer state is restored too (the state is one tree) and dropped; the model config, model class and
    optimizer come from the checkpoint's own metadata, so nothing about the run needs to be known. LoRA adapters
    are merged into their weights: what comes back is a plain model for decoding, evaluation or export.
    """
    from flax import nnx

    from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel
    from internlm2_jax.model.lora import merge_lora
    from internlm2_jax.parallel import MeshConfig, make_mesh
    from internlm2_jax.train.optim import OptimizerConfig, make_optimizer
    from internlm2_jax.train.state import abstract_train_state, model_graphdef

    checkpointer = Checkpointer(Path(run_dir) / "checkpoints")
    steps = checkpointer.steps()
    if not steps:
        checkpointer.close()
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint in {run_dir}/checkpoints")
    meta = checkpointer.manager.restore(steps[-1], args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    model = ModelConfig.from_dict(meta["model"])
    optimizer = OptimizerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["optimizer"].items()})
    model_class = {c.__name__: c for c in (InternLM2ForCausalLM, InternLM2ForRewardModel)}[
        meta.get("model_class", InternLM2ForCausalLM.__name__)]
    mesh = mesh if mesh is not None else make_mesh(MeshConfig(), jax.devices()[:1])
    abstract = abstract_train_state(model, make_optimizer(optimizer), mesh, model_class=model_class,
                                    trainable=optimizer.trainable)
    found = checkpointer.restore_latest(abstract, model)
    checkpointer.close()
    if found is None:
        raise FileNotFoundError(f"{run_dir}: no readable checkpoint")
    graphdef, _ = model_graphdef(model, model_class)
    merged = merge_lora(nnx.merge(graphdef, found[1].params))
    return merged.cfg, merged, found[3]
