"""Orbax checkpoints of the training state, the data iterator's state and the run's provenance, in one step folder.

Saving is asynchronous (the step returns while the bytes are written). Restoring goes to the newest complete step.
Only a step that is damaged (missing or truncated files, unreadable metadata: a crash mid-write on a file system
without atomic renames, a deleted file) falls back to the previous one, with a warning; when steps exist and none can
be read, restoring raises `CheckpointRestoreError` listing each step and why, and leaves the directory as it is (a
run that silently started over would lose its work: orbax refuses to save below the old newest step).

A checkpoint that does not fit the run is refused at once, naming what differs, since an older step of the same run
would not fit either: the model's shape fields, the objective and model class, the trainable set and decay masks (they
decide the optimizer state's tree), and finally the state tree itself (every leaf's path, shape and dtype, recorded
at save time). What describes a saved run (provenance, the compatibility check, the fallback policy, loading a run
for inference) lives in `internlm2_jax.artifacts`, below the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from internlm2_jax.artifacts import CheckpointMismatch, check_compatible, restore_newest, tree_signature
from internlm2_jax.config import ModelConfig
from internlm2_jax.paths import absolute

log = logging.getLogger("internlm2_jax.checkpoint")


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

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 1000, keep: int = 3,
                 async_save: bool = True):
        self.directory = absolute(directory)  # a bucket URL stays one: orbax writes there through tensorstore
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
                                  meta=ocp.args.JsonSave({**metadata, "state_tree": tree_signature(state)}))
        return self.manager.save(step, args=args, force=force)

    def restore_latest(self, abstract_state, run: ModelConfig | dict[str, Any]):
        """(step, state, data_state, metadata) of the newest readable checkpoint, or None if there is none.

        `abstract_state` holds ShapeDtypeStructs with shardings: the state lands directly on this run's mesh,
        whatever mesh it was saved from. `run` is the run's metadata (as it would save it) or just its ModelConfig;
        a checkpoint that does not fit it raises CheckpointMismatch, a damaged one is skipped with a warning, and
        CheckpointRestoreError is raised when steps exist but none can be read.
        """
        run = {"model": dataclasses.asdict(run)} if isinstance(run, ModelConfig) else run

        def restore(step: int, where: str):
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            check_compatible(meta, run, where, abstract_state)
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            states = restored["data"]["processes"]
            if len(states) != jax.process_count():
                raise CheckpointMismatch(f"{where}: saved by {len(states)} processes, resumed by "
                                         f"{jax.process_count()}; the data iterators cannot be re-split")
            log.info("restored %s", where)
            return restored["state"], states[jax.process_index()], meta

        found = restore_newest(self.manager, self.directory, restore)
        return None if found is None else (found[0], *found[1])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
