"""A QLoRA train state through the run's orbax checkpoints (train/checkpoint.py): the NF4 base leaves (codes, absmax
codes, their scales and offsets), the fp32 adapters beside a bf16 base, and the adapters' Adam moments are saved and
restored bit for bit, on the mesh they were saved from and on another; training resumes to the losses of a run that
was never interrupted (LoRA dropout masks included). A float (non-QLoRA) model or another NF4 block cannot take the
checkpoint: the refusal names the leaf.

The model is test_qlora.py's (hidden 256, two 128-wide heads, one KV head, MLP 512: bitsandbytes' blocks divide it).
"""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from internlm2_jax.artifacts import CheckpointMismatch, provenance
from internlm2_jax.config import LoraConfig, preset
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.train import OptimizerConfig, StepConfig, init_train_state
from internlm2_jax.train.checkpoint import Checkpointer
from internlm2_jax.train.loop import build_program

QLORA = LoraConfig(rank=8, alpha=16.0, dropout=0.1, quantize_base="nf4", adapter_dtype="float32")
CFG = preset("tiny", hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
             intermediate_size=512, scan_layers=True, param_dtype="bfloat16", lora=QLORA)
OPT = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, total_steps=20, weight_decay=0.0, trainable=("lora_",))
SAVED_MESH, OTHER_MESH = (2, 2, 2, 1), (1, 4, 1, 2)  # (data, fsdp, tensor, sequence)
SAVED_AT, STEPS = 2, 4


def batch(step: int) -> dict[str, np.ndarray]:
    ids = np.random.RandomState(step).randint(3, 120, (8, 33)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((8, 32), np.int32),
            "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)).copy(),
            "loss_mask": np.ones((8, 32), np.float32)}


def program(cfg, shape):
    mesh = make_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
    return build_program(cfg, OPT, StepConfig(), mesh)


def metadata(cfg) -> dict:
    """What the training loop records with every checkpoint (and compares with the run's on restore)."""
    return provenance(model=dataclasses.asdict(cfg), optimizer=dataclasses.asdict(OPT), seed=0, objective="lm",
                      model_class="InternLM2ForCausalLM")


def run_steps(prog, state, start: int, stop: int):
    losses = []
    for step in range(start, stop):
        with jax.set_mesh(prog.mesh):
            state, metrics = prog.step(tuple(sorted(batch(step))))(state, batch(step))
        losses.append(float(metrics["loss"]))
    return state, losses


def restore(directory, prog, cfg):
    checkpointer = Checkpointer(directory)
    try:
        return checkpointer.restore_latest(prog.abstract_state, metadata(cfg))
    finally:
        checkpointer.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint directory, the saved state on the host, the losses of the uninterrupted run, its program)."""
    directory = tmp_path_factory.mktemp("qlora_ckpt")
    prog = program(CFG, SAVED_MESH)
    state = jax.device_put(init_train_state(CFG, prog.tx, prog.mesh, trainable=OPT.trained), prog.shardings)
    state, losses = run_steps(prog, state, 0, SAVED_AT)
    checkpointer = Checkpointer(directory, save_every=1)
    checkpointer.save(SAVED_AT, state, data_state={"next_batch": SAVED_AT}, metadata=metadata(CFG))
    checkpointer.close()
    host = jax.tree.map(np.asarray, state)
    _, rest = run_steps(prog, state, SAVED_AT, STEPS)
    return directory, host, losses + rest, prog


def assert_bit_identical(restored, saved_state):
    leaves, saved_leaves = jax.tree.leaves(restored), jax.tree.leaves(saved_state)
    assert len(leaves) == len(saved_leaves)
    for a, b in zip(leaves, saved_leaves, strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b)


def test_the_saved_state_holds_the_nf4_base_the_fp32_adapters_and_their_moments_only(saved):
    _, state, losses, _ = saved
    assert np.isfinite(losses).all()
    wqkv = state.params["model"]["layers"]["attention"]["wqkv"].get_value()
    assert wqkv.codes.dtype == np.uint8 and wqkv.absmax.dtype == np.uint8 and wqkv.absmax_offset.dtype == np.float32
    adapter = state.params["model"]["layers"]["attention"]["wqkv_lora"]["lora_a"].get_value()
    assert adapter.dtype == np.float32 and state.params["output"].get_value().dtype.name == "bfloat16"
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
    adapters = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.params) if "lora_" in str(path)]
    assert sum(m.size for m in moments) == 2 * sum(a.size for a in adapters)
    assert {m.dtype for m in moments} == {np.dtype(np.float32)}


def test_restored_on_the_same_mesh_bit_for_bit_and_resumed_to_the_uninterrupted_losses(saved):
    directory, state, losses, prog = saved
    step, restored, data_state, _ = restore(directory, prog, CFG)
    assert step == SAVED_AT and data_state == {"next_batch": SAVED_AT}
    assert_bit_identical(restored, state)
    _, resumed = run_steps(prog, restored, SAVED_AT, STEPS)
    assert resumed == losses[SAVED_AT:]  # the same program on the same state and batches: exactly


def test_restored_onto_another_mesh_bit_for_bit_with_the_nf4_leaves_on_its_layout(saved):
    directory, state, _, _ = saved
    _, restored, _, _ = restore(directory, program(CFG, OTHER_MESH), CFG)
    assert_bit_identical(restored, state)
    codes = restored.params["model"]["layers"]["feed_forward"]["w1"].get_value().codes  # [layers, embed/2, mlp]
    assert codes.sharding.spec == P(None, ("fsdp", "sequence"), None)


@pytest.mark.slow  # 13 s idle, ~25 s on 2 loaded cores: the step compiled again for the other mesh
def test_resumed_on_another_mesh_to_the_uninterrupted_losses(saved):
    directory, _, losses, _ = saved
    prog = program(CFG, OTHER_MESH)
    _, restored, _, _ = restore(directory, prog, CFG)
    _, resumed = run_steps(prog, restored, SAVED_AT, STEPS)
    np.testing.assert_allclose(resumed, losses[SAVED_AT:], rtol=1e-5)  # another reduction order


@pytest.mark.parametrize("lora, leaf", [
    (dataclasses.replace(QLORA, quantize_base=None),  # a float base: the NF4 leaves are not in its tree
     r"leaves only in the checkpoint, e\.g\. \[\".params\['model'\]\['layers'\]\['attention'\]\['wo'\]\.value\.absmax"),
    (dataclasses.replace(QLORA, nf4_block=128),  # twice the block: half the absmax rows
     r"\.params\['model'\]\['layers'\]\['attention'\]\['wo'\]\.value\.absmax: checkpoint \[\[2, 4, 256\], 'uint8'\] "
     r"vs run \[\[2, 2, 256\], 'uint8'\]"),
])
def test_another_base_cannot_take_the_checkpoint_and_the_error_names_the_leaf(saved, lora, leaf):
    directory, *_ = saved
    cfg = CFG.replace(lora=lora)
    with pytest.raises(CheckpointMismatch, match=leaf):
        restore(directory, program(cfg, SAVED_MESH), cfg)
