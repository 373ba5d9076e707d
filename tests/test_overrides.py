"""`--set path=value`: typed parsing into frozen dataclass trees, with errors naming the field."""

import dataclasses

import pytest

from internlm2_jax.config import LoraConfig, RopeScaling, preset
from internlm2_jax.experiment import Experiment
from internlm2_jax.overrides import OverrideError, apply_overrides, to_dict
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.train import OptimizerConfig
from internlm2_jax.train.loop import TrainConfig

EXP = Experiment(name="t", model=preset("tiny"), train=TrainConfig(steps=10))


def test_values_are_parsed_by_the_field_type():
    exp = apply_overrides(EXP, ["train.steps=100", "optimizer.peak_lr=1e-3", "model.scan_layers=true",
                                "mesh.fsdp=4", "model.dtype=bfloat16", "train.init_from=runs/a",
                                "optimizer.no_decay=norm,tok_embeddings", "model.rope_scaling.factor=4"])
    assert exp.train.steps == 100 and exp.optimizer.peak_lr == 1e-3 and exp.model.scan_layers
    assert exp.mesh == MeshConfig(fsdp=4) and exp.model.dtype == "bfloat16" and exp.train.init_from == "runs/a"
    assert exp.optimizer.no_decay == ("norm", "tok_embeddings")
    assert exp.model.rope_scaling == RopeScaling("dynamic", 4.0)
    assert apply_overrides(EXP, ["model.rope_scaling=None", "train.init_from=None"]).model.rope_scaling is None
    assert EXP.train.steps == 10  # the original is untouched
    assert to_dict(exp)["optimizer"]["peak_lr"] == 1e-3


@pytest.mark.parametrize("assignment, message", [
    ("train.stepz=3", "TrainConfig has no field 'stepz'"),
    ("train.steps=1e3", "train.steps: expected an integer, got '1e3'"),
    ("model.scan_layers=maybe", "expected true/false"),
    ("train.steps", "expected path.to.field=value"),
    ("model.num_key_value_heads=3", "num_attention_heads \\(4\\) must be divisible"),
    ("optimizer.warmup_steps=200000", "warmup_steps \\(200000\\) must be smaller than total_steps"),
    ("train.steps.x=1", "int has no fields"),
])
def test_bad_overrides_name_the_field_and_the_problem(assignment, message):
    with pytest.raises(OverrideError, match=message):
        apply_overrides(EXP, [assignment])


def test_dataclass_validation_runs_on_the_result():
    with pytest.raises(OverrideError, match="train.batch_size must be positive"):
        apply_overrides(EXP, ["train.batch_size=0"])
    assert dataclasses.replace(OptimizerConfig(), peak_lr=1.0).peak_lr == 1.0


def test_a_none_dataclass_field_is_built_from_its_defaults_then_set():
    assert EXP.model.lora is None
    exp = apply_overrides(EXP, ["model.lora.rank=4", "model.lora.targets=wqkv,wo"])
    assert exp.model.lora == LoraConfig(rank=4, targets=("wqkv", "wo"))  # the other fields keep their defaults
    assert apply_overrides(EXP, ["model.lora.alpha=8"]).model.lora == LoraConfig(alpha=8.0)
    assert apply_overrides(exp, ["model.lora=None"]).model.lora is None
    assert EXP.model.lora is None  # the original is untouched
    with pytest.raises(OverrideError, match="model.lora.rank: expected an integer"):
        apply_overrides(EXP, ["model.lora.rank=big"])
    with pytest.raises(OverrideError, match="lora.rank must be a positive integer"):
        apply_overrides(EXP, ["model.lora.rank=0"])
    with pytest.raises(OverrideError, match="model.rope_scaling is None and RopeScaling has no usable defaults"):
        apply_overrides(EXP, ["model.rope_scaling=None", "model.rope_scaling.factor=4"])
