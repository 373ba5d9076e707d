"""Saved models and runs: model and run directories -> a model on a mesh, and the provenance every checkpoint and
evaluation result records.

- A **model directory** (config.json, *.safetensors, tokenizer files) is read by `convert.load_pretrained`.
- A **run directory** holds `checkpoints/`: orbax steps written by `train.checkpoint.Checkpointer`, each with the
  training state, the data iterators' state and the run's metadata (`provenance` plus the resolved configs). Loading
  one for inference restores only the parameters of its newest readable step, straight onto their shardings, with
  the model config and class the run recorded: nothing about the trainer (optimizer, objective, extra state) needs
  to be known, so evaluation, serving, generation and conversion never import `train`.
- **Provenance**: schema version, git commit, package versions; `check_compatible` refuses a checkpoint of another
  schema, shape, objective or state tree with a message naming what differs, and `restore_newest` falls back past a
  damaged step (only a damaged one) with a warning.

`load_model` is the one loader of "a model directory or a run directory" that every command and `train.init_weights`
use; `load_for_decoding` adds the tokenizer.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from internlm2_jax.config import ModelConfig
from internlm2_jax.convert.hf import load_pretrained
from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel, model_graphdef
from internlm2_jax.model.kv_heads import kv_head_factor, replicate_kv_heads
from internlm2_jax.model.lora import merge_lora
from internlm2_jax.model.quantize import check_quantize_mode, quantize_model
from internlm2_jax.parallel import DEFAULT_RULES, MeshConfig, inference_mesh, make_mesh, mesh_of, state_shardings
from internlm2_jax.parallel.mesh import split_cpu
from internlm2_jax.paths import absolute

SCHEMA_VERSION = 2  # 2: the data state holds every process's iterator state
# Fields that decide parameter shapes or the parameter tree; the rest (rope_theta, dtype, remat, ...) may change
# between a run and its continuation, as in the 4K -> 32K long-context phase.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "bias", "tie_word_embeddings", "scan_layers", "param_dtype")
# Run fields that decide the state's tree beyond the model's shape: (metadata key, field within it or None).
TREE_FIELDS = (("objective", None), ("model_class", None), ("optimizer", "trainable"), ("optimizer", "no_decay"))
# The model classes a run directory can be loaded as, by the `model_class` name its metadata records
# (`register_model_class` adds one an experiment defines).
MODEL_CLASSES = {c.__name__: c for c in (InternLM2ForCausalLM, InternLM2ForRewardModel)}


def register_model_class(model_class: type) -> type:
    """Lets run directories trained with `model_class` (built as `model_class(cfg, rngs=...)`, with a `.cfg`) load
    for inference; usable as a class decorator."""
    known = MODEL_CLASSES.get(model_class.__name__)
    if known is not None and known.__qualname__ != model_class.__qualname__:
        raise ValueError(f"a different model class is already registered as {model_class.__name__!r}")
    MODEL_CLASSES[model_class.__name__] = model_class
    return model_class

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "sentencepiece", "internlm2-jax")
# Messages of the errors orbax / tensorstore raise for a damaged step (tensorstore reports absl status codes).
_DAMAGE_MARKERS = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "corrupt", "checksum", "truncated",
                   "pytree structure error")

log = logging.getLogger("internlm2_jax.checkpoint")
T = TypeVar("T")


class CheckpointMismatch(ValueError):
    """The checkpoint belongs to a different model, objective, optimizer tree or schema; the message names what."""


class CheckpointRestoreError(RuntimeError):
    """Checkpoints exist but none could be restored; the message lists every step and its error."""


# ---- provenance ------------------------------------------------------------------------------------------------------

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
    """What every checkpoint and evaluation result records: schema version, git commit, package versions, plus
    `extra` (the resolved config, seeds, tokenizer hash, data-manifest hash)."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"schema_version": SCHEMA_VERSION, "git_commit": git_commit(), "packages": versions, **extra}


def tree_signature(tree) -> dict[str, list]:
    """{leaf path: [shape, dtype]} of a state (arrays or ShapeDtypeStructs): what makes a restore possible."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)] for path, leaf in leaves}


def _normalised(value):
    return json.loads(json.dumps(value, default=str))  # tuples as lists, as they come back from the JSON file


def _lora_shape(model: dict) -> Any:
    lora = model.get("lora")
    return None if lora is None else {"rank": lora["rank"], "targets": list(lora["targets"])}


def check_compatible(saved: dict[str, Any], run: dict[str, Any], where: str, abstract_state=None, *,
                     subtree: str = "") -> None:
    """Raises CheckpointMismatch naming every difference between a checkpoint's metadata and the run's (`run` holds
    at least `model`; the tree fields and the state tree are compared when both sides recorded them).

    `subtree` (a `tree_signature` path such as ".params") compares `abstract_state` with that part of the saved
    state only: what restoring the parameters alone needs."""
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
        old = {k: v for k, v in saved["state_tree"].items()
               if not subtree or k.startswith((subtree + "[", subtree + "."))}
        new = {subtree + k: v for k, v in tree_signature(abstract_state).items()}
        changed = [f"{k}: checkpoint {old[k]} vs run {new[k]}" for k in old if k in new and old[k] != new[k]]
        only_old, only_new = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        if changed or only_old or only_new:
            parts = ([f"{len(only_old)} leaves only in the checkpoint, e.g. {only_old[:3]}"] if only_old else []) + \
                    ([f"{len(only_new)} leaves only in the run, e.g. {only_new[:3]}"] if only_new else []) + changed[:3]
            raise CheckpointMismatch(f"{where}: the checkpoint's state tree does not fit this run "
                                     f"({'; '.join(parts)})")


# ---- checkpoint steps ------------------------------------------------------------------------------------------------

def is_damage(error: BaseException) -> bool:
    """True for the errors of a damaged step (missing, truncated or unparsable files), which an older step may not
    share; anything else (a bug, out of memory, a permission problem of the whole directory) is not retried."""
    if isinstance(error, (FileNotFoundError, json.JSONDecodeError, EOFError)):
        return True
    return isinstance(error, (ValueError, OSError)) and any(m in str(error) for m in _DAMAGE_MARKERS)


def restore_newest(manager: ocp.CheckpointManager, directory: str | os.PathLike,
                   restore: Callable[[int, str], T]) -> tuple[int, T] | None:
    """(step, `restore(step, where)`) for the newest step that restores, or None when there is no step.

    A damaged step (`is_damage`) is skipped with a warning; CheckpointMismatch propagates at once (an older step of
    the same run would not fit either); any other error, or every step damaged, raises CheckpointRestoreError and
    leaves the directory as it is (a run that silently started over would lose its work)."""
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        where = f"{directory}/{step}"
        try:
            return step, restore(step, where)
        except CheckpointMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - classified: only damage of this one step falls back
            if not is_damage(e):
                raise CheckpointRestoreError(f"{where} could not be restored and the error is not one of a damaged "
                                             f"step, so no older step is tried: {type(e).__name__}: {e}") from e
            failures.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
            warnings.warn(f"checkpoint {where} is damaged ({type(e).__name__}: {str(e)[:300]}); trying the previous "
                          "one", stacklevel=3)
    if failures:
        raise CheckpointRestoreError(f"{directory}: none of the {len(failures)} checkpoints can be restored; nothing "
                                     "was changed on disk. Move the directory away to start over, or repair a step:"
                                     "\n  " + "\n  ".join(failures))
    return None


# ---- run directories -------------------------------------------------------------------------------------------------

def is_run_directory(path: str | os.PathLike) -> bool:
    return (epath.Path(path) / "checkpoints").is_dir()


def run_tokenizer(meta: dict):
    """The tokenizer a run was trained with (from `load_run`'s metadata), if the file it names still exists."""
    from internlm2_jax.tokenizer import Tokenizer

    if not meta.get("tokenizer_path"):
        return None
    path = epath.Path(meta["tokenizer_path"])
    if path.is_file():
        return Tokenizer.from_file(path)
    if path.is_dir():
        return Tokenizer.from_pretrained(path)
    return None


def _model_class(meta: dict, where: str):
    name = meta.get("model_class", InternLM2ForCausalLM.__name__)
    if name not in MODEL_CLASSES:
        raise CheckpointMismatch(f"{where}: a {name} cannot be loaded as a model (known: {', '.join(MODEL_CLASSES)})")
    return MODEL_CLASSES[name]


def load_run(run_dir: str | os.PathLike, *, mesh=None, rules=DEFAULT_RULES, dtype: str | None = None):
    """(model config, model, metadata) from the newest readable checkpoint of a run directory.

    Only the parameters are read (the optimizer state and the rest of the training state stay on disk), placed on
    `mesh` (default: one device) by `rules`, converted to `dtype` as they are read when given (parameters and
    compute; default: as trained); the model config and class come from the checkpoint's own metadata.
    LoRA adapters are merged into their weights: what comes back is a plain model for decoding, evaluation or
    export. The directory is only read (a run still writing to it is not disturbed).
    """
    directory = absolute(run_dir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False,
                                           enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(directory, options=options)
    try:
        if not manager.all_steps():
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint in {run_dir}/checkpoints")
        mesh = mesh if mesh is not None else make_mesh(MeshConfig(), jax.devices()[:1])

        def restore(step: int, where: str):
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            check_compatible(meta, {"model": meta["model"]}, where)  # the schema: the rest is the run's own
            cfg = ModelConfig.from_dict(meta["model"])
            graphdef, abstract = model_graphdef(cfg, _model_class(meta, where))
            check_compatible(meta, {"model": meta["model"]}, where, abstract, subtree=".params")
            if dtype is not None:  # orbax converts each array as it reads it
                graphdef, abstract = model_graphdef(cfg.replace(param_dtype=dtype, dtype=dtype),
                                                    _model_class(meta, where))
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                  state_shardings(abstract, mesh, rules))
            item = {"params": target}
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
            log.info("restored the parameters of %s", where)
            return nnx.merge(graphdef, restored["state"]["params"]), meta

        _, (model, meta) = restore_newest(manager, directory, restore)
    finally:
        manager.close()
    merged = merge_lora(model)
    return merged.cfg, merged, meta


# ---- a model directory or a run directory ----------------------------------------------------------------------------

def inference_dtype(mesh=None, requested: str | None = None) -> str:
    """The dtype inference loads a model in: `requested`, else bfloat16 on accelerators and float32 on the CPU
    (where bf16 matmuls are emulated, and slower)."""
    if requested is not None:
        if requested not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {requested!r}")
        return requested
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    return "float32" if platform == "cpu" else "bfloat16"


def load_model(path: str | os.PathLike, *, mesh=None, rules=DEFAULT_RULES, quantize: str | None = None,
               dtype: str | None = None, fit_kv_heads: bool = False, **config_overrides: Any):
    """(model config, model, run metadata or None) from a model directory or a run directory (its newest readable
    step, LoRA merged).

    The parameters are placed on `mesh` by `rules` (default: one device), each as it is read, in `dtype` (parameters
    and compute; default: as stored, and as trained for a run). `config_overrides` (`scan_layers`, ...: see
    `load_pretrained`) apply to a model directory; a run's model comes as it was trained. `fit_kv_heads` (for
    inference) repeats kv heads when the mesh's tensor axis outnumbers them (`model.kv_heads`). `quantize` (for
    decoding, `model.quantize.quantize_model`): "int8", weight-only int8 projections and head; "int4", the
    projections as int4 in groups of 128 inputs (W4A16, the head float). A model directory holding an AWQ
    checkpoint (config.json's `quantization_config`) loads as int4 whatever `quantize` says, except "int8", which is
    refused (its weights are rounded already).
    """
    check_quantize_mode(quantize)
    path = epath.Path(path)
    meta = None
    tensor = dict(mesh.shape).get("tensor", 1) if fit_kv_heads and mesh is not None else 1
    if is_run_directory(path):
        _, model, meta = load_run(path, mesh=mesh, rules=rules, dtype=dtype)
    else:
        if dtype is not None:
            config_overrides = {**config_overrides, "param_dtype": dtype, "dtype": dtype}
        # Quantized as it is read (never whole in float), unless kv heads may need repeating first.
        _, model = load_pretrained(path, mesh=mesh, rules=rules, quantize=quantize if tensor == 1 else None,
                                   **config_overrides)
        quantize = quantize if tensor > 1 else None
    model = replicate_kv_heads(model, kv_head_factor(model.cfg, tensor), rules)
    model = quantize_model(model, quantize, rules)
    return model.cfg, model, meta


def placement_summary(model) -> str:
    """One line: parameter memory in all and on the fullest device, the dtype and the mesh."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    total = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
    per_device: dict = {}
    for leaf in leaves:
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.size * shard.data.dtype.itemsize
    mesh = mesh_of(leaves)
    where = f"mesh {dict(mesh.shape)}" if mesh is not None and mesh.size > 1 else "one device"
    return (f"parameters: {total / 1e9:.3f} GB ({model.cfg.param_dtype}) on {where}, "
            f"{max(per_device.values()) / 1e9:.3f} GB on the fullest device")


def add_placement_arguments(parser, *, dtype: bool = True) -> None:
    """--mesh, --cpu-devices and (with `dtype`) --dtype: where and in which dtype a command loads its model."""
    parser.add_argument("--mesh", help="the device mesh, e.g. data=2,tensor=4 (axes data, fsdp, tensor, sequence; "
                                       "axes not named are 1, one may be -1: the rest; default: one device)")
    if dtype:
        parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                            help="parameters and compute (default: bfloat16 on accelerators, float32 on the CPU)")
    parser.add_argument("--cpu-devices", type=int, metavar="N",
                        help="split the CPU into N devices (for a --mesh on a CPU machine)")


def add_weight_arguments(parser) -> None:
    """--int8 / --int4 (one at most): weight-only quantized projections for decoding."""
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--int8", action="store_true", help="weight-only int8 projections and head (per channel)")
    weights.add_argument("--int4", action="store_true",
                         help="weight-only int4 projections, asymmetric in groups of 128 inputs (the AWQ format; an "
                              "AWQ model directory loads as int4 without it)")


def quantize_from_arguments(args) -> str | None:
    """`load_for_decoding`'s `quantize` from `add_weight_arguments`' flags."""
    return "int8" if args.int8 else "int4" if args.int4 else None


def mesh_from_arguments(args):
    """The mesh of `add_placement_arguments`' flags (None: one device); ValueError naming a bad one."""
    if args.cpu_devices is not None:
        split_cpu(args.cpu_devices)
    return inference_mesh(args.mesh) if args.mesh else None


def placement_from_arguments(args):
    """(mesh, dtype) from `add_placement_arguments`' flags; ValueError naming a bad one."""
    mesh = mesh_from_arguments(args)
    return mesh, inference_dtype(mesh, args.dtype)


def load_for_decoding(path: str | os.PathLike, *, quantize: str | None = None, mesh=None, dtype: str | None = None):
    """(model, tokenizer) from a model directory or a run directory (with the tokenizer the run was trained with)
    on `mesh` (default: one device) in `inference_dtype(mesh, dtype)`, kv heads fitted to the mesh; `quantize`
    "int8" or "int4" for weight-only quantized weights (see `load_model`)."""
    from internlm2_jax.tokenizer import Tokenizer

    path = epath.Path(path)
    _, model, meta = load_model(path, quantize=quantize, mesh=mesh, dtype=inference_dtype(mesh, dtype),
                                fit_kv_heads=True)
    if meta is None:
        return model, Tokenizer.from_pretrained(path)
    tokenizer = run_tokenizer(meta)
    if tokenizer is None:
        raise FileNotFoundError(f"{path}: the run's tokenizer ({meta.get('tokenizer_path')}) is gone")
    return model, tokenizer
