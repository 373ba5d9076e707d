"""The artifacts loader: a run directory's parameters alone, restored onto any mesh without the trainer (whatever
optimizer state sits beside them), past a damaged newest step, refused for another schema; model and run directories
through one `load_model`; the inference commands import nothing from `internlm2_jax.train`."""

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from internlm2_jax.artifacts import CheckpointMismatch, load_model, load_run, provenance, register_model_class
from internlm2_jax.config import preset
from internlm2_jax.convert import save_pretrained
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.train import OptimizerConfig, init_train_state
from internlm2_jax.train.checkpoint import Checkpointer

CFG = preset("tiny")


def params_of(model) -> list[np.ndarray]:
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two steps of a run saved by the trainer's Checkpointer, with plain Adam (not the recipe's optimizer: the
    loader must not need to know it)."""
    directory = tmp_path_factory.mktemp("run")
    state = init_train_state(CFG, optax.adam(1e-3), make_mesh(MeshConfig(data=2, fsdp=4)), seed=5)
    checkpointer = Checkpointer(directory / "checkpoints", save_every=1, keep=2, async_save=False)
    meta = provenance(model=dataclasses.asdict(CFG), optimizer=dataclasses.asdict(OptimizerConfig()), seed=5,
                      objective="lm", model_class="InternLM2ForCausalLM")
    for step in (1, 2):
        checkpointer.save(step, state, data_state={"next": step}, metadata=meta)
    checkpointer.close()
    return directory, [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def test_a_run_loads_its_parameters_onto_another_mesh_bit_exactly(run_dir):
    directory, saved = run_dir
    cfg, model, meta = load_run(directory, mesh=make_mesh(MeshConfig(fsdp=2, tensor=4)))
    assert cfg == CFG and meta["seed"] == 5 and meta["objective"] == "lm"
    assert model.model.layers[0].feed_forward.w1.get_value().sharding.spec == P("fsdp", "tensor")
    for got, want in zip(params_of(model), saved, strict=True):
        np.testing.assert_array_equal(got, want)
    assert sorted(p.name for p in (directory / "checkpoints").iterdir()) == ["1", "2"]  # only read


def test_a_damaged_newest_step_falls_back_and_another_schema_is_refused(run_dir, tmp_path):
    shutil.copytree(run_dir[0], tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "2" / "meta" / "metadata").write_text("{")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, model, _ = load_run(tmp_path / "run")
    assert any("checkpoints/2 is damaged" in str(w.message) for w in caught)
    for got, want in zip(params_of(model), run_dir[1], strict=True):
        np.testing.assert_array_equal(got, want)

    meta_file = tmp_path / "run" / "checkpoints" / "1" / "meta" / "metadata"
    meta_file.write_text(json.dumps(json.loads(meta_file.read_text()) | {"schema_version": 1}))
    with warnings.catch_warnings(), pytest.raises(CheckpointMismatch, match="schema version 1"):
        warnings.simplefilter("ignore")  # step 2 is still damaged
        load_run(tmp_path / "run")


def test_model_and_run_directories_load_through_one_loader(run_dir, tmp_path):
    from internlm2_jax.train.init_weights import load_source

    _, from_run, meta = load_model(run_dir[0])
    save_pretrained(from_run, tmp_path / "model", layout="llama")
    cfg, from_dir, none = load_model(tmp_path / "model", param_dtype="float32")
    assert meta["seed"] == 5 and none is None and cfg.num_hidden_layers == CFG.num_hidden_layers
    for got, want in zip(params_of(from_dir), params_of(from_run), strict=True):
        np.testing.assert_array_equal(got, want)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    a, b = load_source(run_dir[0], CFG, mesh), load_source(tmp_path / "model", CFG, mesh)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_model(run_dir[0], quantize="int3")


def test_inference_commands_import_nothing_from_the_trainer():
    code = ("import sys\n"
            "import internlm2_jax.artifacts, internlm2_jax.generate, internlm2_jax.convert.__main__\n"
            "import internlm2_jax.eval.__main__, internlm2_jax.serve.__main__, internlm2_jax.serve.app\n"
            "import internlm2_jax.eval.generation, internlm2_jax.eval.tasks\n"
            "print([m for m in sys.modules if m.startswith('internlm2_jax.train')])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_provenance_records_the_schema_commit_and_packages():
    record = provenance(seed=1)
    assert record["schema_version"] >= 2 and record["git_commit"] and record["packages"]["jax"] == jax.__version__
    assert record["seed"] == 1


class TaggedLM(InternLM2ForCausalLM):
    """A model class an experiment defines (here: the LM under another name)."""


def test_a_run_of_an_experiment_s_own_model_class_loads_once_registered(tmp_path):
    state = init_train_state(CFG, optax.adam(1e-3), make_mesh(MeshConfig(fsdp=8)), seed=1, model_class=TaggedLM)
    checkpointer = Checkpointer(tmp_path / "checkpoints", save_every=1, async_save=False)
    checkpointer.save(1, state, data_state={}, metadata=provenance(model=dataclasses.asdict(CFG), seed=1,
                                                                   model_class="TaggedLM"))
    checkpointer.close()
    with pytest.raises(CheckpointMismatch, match="a TaggedLM cannot be loaded as a model"):
        load_run(tmp_path)
    register_model_class(TaggedLM)
    _, model, _ = load_run(tmp_path)
    assert type(model) is TaggedLM
    for got, want in zip(params_of(model), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(got, np.asarray(want))
