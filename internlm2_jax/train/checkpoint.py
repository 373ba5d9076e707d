"""Orbax checkpoints of the training state, the data iterator's state and the run's provenance, in one step folder.

Saving is asynchronous (the step returns while the bytes are written). Restoring goes to the newest complete step.
Only a step that is damaged (missing or truncated files, unreadable metadata: a crash mid-write on a file system
without atomic renames, a deleted file) falls back to the previous one, with a warning; when steps exist and none can
be read, restoring raises `CheckpointRestoreError` listing each step and why, and leaves the directory as it is (a
run that silently started over would lose its work: orbax refuses to save below the old newest step).

A checkpoint that does not fit the run is refused at once, naming what differs, since an older step of the same run
would not fit either: the model's shape fields, the objective and model class, the trainable set and decay masks (they
decide the optimizer state's tree), and finally the state tree itself (every leaf's path, shape and dtype, recorded
at save time).
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


# Run fields that decide the state's tree beyond the model's shape: (metadata key, field within it or None).
TREE_FIELDS = (("objective", None), ("model_class", None), ("optimizer", "trainable"), ("optimizer", "no_decay"))
# Messages of the errors orbax / tensorstore raise for a damaged step (tensorstore reports absl status codes).
_DAMAGE_MARKERS = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "corrupt", "checksum", "truncated",
                   "pytree structure error")


class CheckpointMismatch(ValueError):
    """The checkpoint belongs to a different model, objective, optimizer tree or schema; the message names what."""


class CheckpointRestoreError(RuntimeError):
    """Checkpoints exist but none could be restored; the message lists every step and its error."""


def is_damage(error: BaseException) -> bool:
    """True for the errors of a damaged step (missing, truncated or unparsable files), which an older step may not
    share; anything else (a bug, out of memory, a permission problem of the whole directory) is not retried."""
    if isinstance(error, (FileNotFoundError, json.JSONDecodeError, EOFError)):
        return True
    return isinstance(error, (ValueError, OSError)) and any(m in str(error) for m in _DAMAGE_MARKERS)


def tree_signature(tree) -> dict[str, list]:
    """{leaf path: [shape, dtype]} of a state (arrays or ShapeDtypeStructs): what makes a restore possible."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)] for path, leaf in leaves}


def _normalised(value):
    return json.loads(json.dumps(value, default=str))  # tuples as lists, as they come back from the JSON file


def git_commit() -> str:
    """HEAD of the checkout the code runs from, with "-dirty" when tracked files differ from it (a result from
    uncommitted code must not claim a commit it did not run)."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent,
                             check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        head = git("rev-parse", "HEAD")
        if not head:
            return "unknown"
        return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
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


def _lora_shape(model: dict) -> Any:
    lora = model.get("lora")
    return None if lora is None else {"rank": lora["rank"], "targets": list(lora["targets"])}


def check_compatible(saved: dict[str, Any], run: dict[str, Any], where: str, abstract_state=None) -> None:
    """Raises CheckpointMismatch naming every difference between a checkpoint's metadata and the run's (`run` holds
    at least `model`; the tree fields and the state tree are compared when both sides recorded them)."""
    if saved.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointMismatch(f"{where}: checkpoint schema version {saved.get('schema_version')} cannot be read "
                                 f"by this code (schema {SCHEMA_VERSION})")
    saved_model, run_model = saved.get("model") or {}, _normalised(run["model"])
    differ = [f"{k}: checkpoint {saved_model.get(k)!r} vs run {run_model[k]!r}" for k in SHAPE_FIELDS
              if k in saved_model and saved_model[k] != run_model[k]]
    if "lora" in saved_model and _lora_shape(saved_model) != _lora_shape(run_model):
        differ.append(f"lora: checkpoint {_lora_shape(saved_model)!r} vs run {_lora_shape(run_model)!r}")
    for key, field in TREE_FIELDS:
        if key not in saved or key not in run:
            continue
        old, new = saved[key], _normalised(run[key])
        if field is not None:
            old, new = (old or {}).get(field), (new or {}).get(field)
        if old != new:
            differ.append(f"{key}{'.' + field if field else ''}: checkpoint {old!r} vs run {new!r}")
    if differ:
        raise CheckpointMismatch(f"{where}: the checkpoint does not fit this run ({'; '.join(differ)})")
    if abstract_state is not None and "state_tree" in saved:
        old, new = saved["state_tree"], tree_signature(abstract_state)
        changed = [f"{k}: checkpoint {old[k]} vs run {new[k]}" for k in old if k in new and old[k] != new[k]]
        only_old, only_new = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        if changed or only_old or only_new:
            parts = ([f"{len(only_old)} leaves only in the checkpoint, e.g. {only_old[:3]}"] if only_old else []) + \
                    ([f"{len(only_new)} leaves only in the run, e.g. {only_new[:3]}"] if only_new else []) + changed[:3]
            raise CheckpointMismatch(f"{where}: the checkpoint's state tree does not fit this run "
                                     f"({'; '.join(parts)})")


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
        failures = []
        for step in reversed(self.steps()):
            where = f"{self.directory}/{step}"
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                check_compatible(meta, run, where, abstract_state)
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - classified: only damage of this one step falls back
                if not is_damage(e):
                    raise CheckpointRestoreError(f"{where} could not be restored and the error is not one of a "
                                                 f"damaged step, so no older step is tried: "
                                                 f"{type(e).__name__}: {e}") from e
                failures.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
                warnings.warn(f"checkpoint {where} is damaged ({type(e).__name__}: {str(e)[:300]}); "
                              "trying the previous one", stacklevel=2)
                continue
            states = restored["data"]["processes"]
            if len(states) != jax.process_count():
                raise CheckpointMismatch(f"{where}: saved by {len(states)} processes, resumed by "
                                         f"{jax.process_count()}; the data iterators cannot be re-split")
            log.info("restored %s", where)
            return step, restored["state"], states[jax.process_index()], meta
        if failures:
            raise CheckpointRestoreError(f"{self.directory}: none of the {len(failures)} checkpoints can be "
                                         "restored; nothing was changed on disk. Move the directory away to start "
                                         "over, or repair a step:\n  " + "\n  ".join(failures))
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
    found = checkpointer.restore_latest(abstract, {"model": meta["model"]})
    checkpointer.close()
    graphdef, _ = model_graphdef(model, model_class)
    merged = merge_lora(nnx.merge(graphdef, found[1].params))
    return merged.cfg, merged, found[3]
