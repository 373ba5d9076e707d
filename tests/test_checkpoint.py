"""Orbax checkpoints: restore onto another mesh bit-exactly, fall back past a damaged step (and only a damaged one),
refuse to start over when no step restores, refuse other shapes, objectives and optimizer trees by name."""

import shutil
import warnings

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from internlm2_jax.config import preset
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.train import OptimizerConfig, abstract_train_state, init_train_state, make_optimizer
from internlm2_jax.artifacts import CheckpointMismatch, CheckpointRestoreError, provenance
from internlm2_jax.train.checkpoint import Checkpointer

CFG = preset("tiny")
TX = make_optimizer(OptimizerConfig(warmup_steps=1, total_steps=10))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    state = init_train_state(CFG, TX, make_mesh(MeshConfig(data=2, fsdp=4)), seed=3)
    checkpointer = Checkpointer(directory, save_every=1, keep=2)
    meta = provenance(model=CFG.__dict__ | {"rope_scaling": None}, seed=3, objective="lm",
                      model_class="InternLM2ForCausalLM", optimizer={"trainable": [], "no_decay": []})
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
    assert any("ckpt/3 is damaged" in str(w.message) for w in caught)
    checkpointer.close()


def damage(step_dir, how):
    if how == "truncated data":
        for f in (step_dir / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(f.read_bytes()[:7])
    elif how == "unparsable metadata":
        (step_dir / "meta" / "metadata").write_text("{")
    elif how == "missing tree metadata":
        (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["truncated data", "unparsable metadata", "missing tree metadata"])
def test_when_no_step_restores_it_raises_listing_every_step_and_touches_nothing(saved, tmp_path, how):
    """Falling back to 'no checkpoint' would restart the run at step 0 (and orbax would then refuse to save below
    the old newest step): every step's failure is reported instead, and the files stay as they were."""
    checkpointer = copy_of(saved, tmp_path)
    for step in (2, 3):
        damage(tmp_path / "ckpt" / str(step), how)
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in (tmp_path / "ckpt").rglob("*"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointRestoreError, match="none of the 2 checkpoints") as info:
            checkpointer.restore_latest(abstract_train_state(CFG, TX, make_mesh(MeshConfig())), CFG)
    assert "step 3: " in str(info.value) and "step 2: " in str(info.value)
    assert sorted((p.relative_to(tmp_path), p.stat().st_size) for p in (tmp_path / "ckpt").rglob("*")) == before
    checkpointer.close()


def test_an_error_that_is_not_damage_is_raised_not_skipped(saved, tmp_path, monkeypatch):
    checkpointer = copy_of(saved, tmp_path)

    def broken(*_, **__):
        raise TypeError("a bug in the restore path")

    monkeypatch.setattr(checkpointer.manager, "restore", broken)
    with pytest.raises(CheckpointRestoreError, match="not one of a damaged step.*a bug in the restore path"):
        checkpointer.restore_latest(abstract_train_state(CFG, TX, make_mesh(MeshConfig())), CFG)
    checkpointer.close()


@pytest.mark.parametrize("change, message", [
    ({"objective": "dpo"}, "objective: checkpoint 'lm' vs run 'dpo'"),
    ({"model_class": "InternLM2ForRewardModel"}, "model_class: checkpoint 'InternLM2ForCausalLM'"),
    ({"optimizer": {"trainable": ["lora_"], "no_decay": []}}, "optimizer.trainable: checkpoint [] vs run ['lora_']"),
    ({"optimizer": {"trainable": [], "no_decay": ["norm"]}}, "optimizer.no_decay: checkpoint [] vs run ['norm']"),
])
def test_a_run_with_another_objective_or_optimizer_tree_is_refused_by_name(saved, tmp_path, change, message):
    checkpointer = copy_of(saved, tmp_path)
    run = {"model": CFG.__dict__ | {"rope_scaling": None}, "objective": "lm", "model_class": "InternLM2ForCausalLM",
           "optimizer": {"trainable": (), "no_decay": ()}} | change
    with pytest.raises(CheckpointMismatch, match=message.replace("[", r"\[").replace("]", r"\]")):
        checkpointer.restore_latest(abstract_train_state(CFG, TX, make_mesh(MeshConfig())), run)
    checkpointer.close()


def test_a_state_tree_that_differs_is_refused_naming_the_leaves(saved, tmp_path):
    """Metadata that does not say what changed (e.g. another optimizer chain) is still caught by the state tree the
    checkpoint recorded, with the differing leaves named."""
    checkpointer = copy_of(saved, tmp_path)
    plain_adam = optax.adam(1e-3)
    with pytest.raises(CheckpointMismatch, match="state tree does not fit.*only in the checkpoint"):
        checkpointer.restore_latest(abstract_train_state(CFG, plain_adam, make_mesh(MeshConfig())), CFG)
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


def test_provenance_says_when_the_work_tree_is_dirty(tmp_path, monkeypatch):
    import subprocess

    from internlm2_jax import artifacts

    repo = tmp_path / "repo"
    package = repo / "pkg"
    package.mkdir(parents=True)
    (package / "code.py").write_text("x = 1\n")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "c"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    monkeypatch.setattr(artifacts, "__file__", str(package / "artifacts.py"))
    clean = artifacts.git_commit()
    assert len(clean) == 40
    (package / "code.py").write_text("x = 2\n")
    assert artifacts.git_commit() == clean + "-dirty"
