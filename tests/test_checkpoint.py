"""Orbax checkpoints: restore onto another mesh bit-exactly, fall back past a corrupt step, refuse other shapes."""

import shutil
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from internlm2_jax.config import preset
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.train import OptimizerConfig, abstract_train_state, init_train_state, make_optimizer
from internlm2_jax.train.checkpoint import Checkpointer, CheckpointMismatch, provenance

CFG = preset("tiny")
TX = make_optimizer(OptimizerConfig(warmup_steps=1, total_steps=10))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    state = init_train_state(CFG, TX, make_mesh(MeshConfig(data=2, fsdp=4)), seed=3)
    checkpointer = Checkpointer(directory, save_every=1, keep=2)
    meta = provenance(model=CFG.__dict__ | {"rope_scaling": None}, seed=3)
    for step in (1, 2, 3):
        checkpointer.save(step, state, data_state={"next_batch": step}, metadata=meta)
    checkpointer.close()
    return directory, jax.tree.map(np.asarray, state)


def copy_of(saved, tmp_path):
    shutil.copytree(saved[0], tmp_path / "ckpt")
    return Checkpointer(tmp_path / "ckpt")


def test_keeps_the_newest_and_restores_bit_exactly_onto_another_mesh(saved, tmp_path):
    checkpointer = copy_of(saved, tmp_path)
    assert checkpointer.steps() == [2, 3]
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    step, state, data, meta = checkpointer.restore_latest(abstract_train_state(CFG, TX, mesh), CFG)
    assert step == 3 and data == {"next_batch": 3} and meta["seed"] == 3
    assert state.params["model"]["layers"][0]["feed_forward"]["w1"][...].sharding.spec == P("fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(saved[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    checkpointer.close()


def test_a_corrupt_latest_step_falls_back_to_the_previous_one(saved, tmp_path):
    checkpointer = copy_of(saved, tmp_path)
    for f in (tmp_path / "ckpt" / "3" / "state").rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, *_ = checkpointer.restore_latest(abstract_train_state(CFG, TX, make_mesh(MeshConfig())), CFG)
    assert step == 2
    assert any("ckpt/3 is unreadable" in str(w.message) for w in caught)
    checkpointer.close()


def test_a_checkpoint_of_another_shape_is_refused_naming_the_fields(saved, tmp_path):
    checkpointer = copy_of(saved, tmp_path)
    other = CFG.replace(num_hidden_layers=3, intermediate_size=96)
    with pytest.raises(CheckpointMismatch, match="num_hidden_layers: checkpoint 2 vs run 3") as info:
        checkpointer.restore_latest(abstract_train_state(other, TX, make_mesh(MeshConfig())), other)
    assert "intermediate_size: checkpoint 160 vs run 96" in str(info.value)
    checkpointer.close()


def test_an_empty_directory_restores_nothing(tmp_path):
    checkpointer = Checkpointer(tmp_path / "none")
    assert checkpointer.restore_latest(abstract_train_state(CFG, TX, make_mesh(MeshConfig())), CFG) is None
    checkpointer.close()
