"""Fine-tuning runs: a LoRA SFT run that resumes and exports merged weights, a reward model started from a causal LM
directory, the experiment's objective/data checks; the tiny experiments end to end behind `-m slow`."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from internlm2_jax.config import LoraConfig, preset
from internlm2_jax.convert import save_pretrained
from internlm2_jax.data.conversations import SFTDataIterator
from internlm2_jax.recipes.finetune_data import docstring_conversations, write_jsonl
from internlm2_jax.experiment import DataConfig, Experiment, load_experiment
from internlm2_jax.model import InternLM2ForCausalLM, InternLM2ForRewardModel
from internlm2_jax.model.lora import merge_lora
from internlm2_jax.parallel import MeshConfig, make_mesh
from internlm2_jax.train import OptimizerConfig, StepConfig
from internlm2_jax.artifacts import load_run
from internlm2_jax.train.init_weights import initial_params
from internlm2_jax.train.loop import TrainConfig, train
from internlm2_jax.model import model_graphdef
from test_launch import ROOT, launch

CFG = preset("tiny", vocab_size=1536, max_position_embeddings=256)


def test_lora_sft_run_resumes_and_its_run_directory_loads_as_a_merged_model(trained, tmp_path):
    data_path = write_jsonl(docstring_conversations(60, seed=0), tmp_path / "sft.jsonl")
    cfg = CFG.replace(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1))
    opt = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, total_steps=6, trainable=("lora_",))

    def run(steps, name):
        data = SFTDataIterator([data_path], trained, 256, 8, seed=0)
        run_cfg = TrainConfig(steps=steps, batch_size=8, seq_len=256, log_every=2, checkpoint_every=2,
                              run_dir=str(tmp_path / name))
        return train(cfg, opt, StepConfig(), MeshConfig(data=2, fsdp=-1), run_cfg, data, metadata={}, progress=False)

    assert run(4, "run").final_step == 4
    resumed = run(6, "run")  # restores step 4: LoRA params, adapter-only optimizer moments, the data position
    straight = run(6, "straight")
    assert resumed.final_step == 6
    np.testing.assert_allclose(resumed.losses[6], straight.losses[6], rtol=1e-6)  # dropout masks included
    graphdef, _ = model_graphdef(cfg)
    expected = merge_lora(nnx.merge(graphdef, resumed.state.params))
    loaded_cfg, loaded, meta = load_run(tmp_path / "run")
    assert loaded_cfg.lora is None and meta["model_class"] == "InternLM2ForCausalLM"
    ids = np.arange(3, 40, dtype=np.int32)[None]
    np.testing.assert_allclose(np.asarray(loaded(ids)), np.asarray(expected(ids)), atol=1e-6)


def test_a_reward_model_starts_from_a_causal_lm_directory_with_a_fresh_head(tmp_path):
    lm = InternLM2ForCausalLM(CFG, rngs=nnx.Rngs(3))
    save_pretrained(lm, tmp_path / "lm")
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=2), jax.devices()[:4])
    target = CFG.replace(lora=LoraConfig(rank=2), scan_layers=True)  # another layer layout, with adapters
    params = dict(nnx.to_flat_state(initial_params(tmp_path / "lm", target, InternLM2ForRewardModel, mesh, seed=1)))
    source = dict(nnx.to_flat_state(nnx.state(lm)))
    np.testing.assert_array_equal(params[("model", "tok_embeddings")].get_value(),
                                  source[("model", "tok_embeddings")].get_value())
    stacked = params[("model", "layers", "attention", "wqkv")].get_value()
    np.testing.assert_array_equal(stacked[1], source[("model", "layers", 1, "attention", "wqkv")].get_value())
    assert ("v_head",) in params and ("output",) not in params  # the LM head stays behind, the reward head is new
    assert not np.any(params[("model", "layers", "attention", "wqkv_lora", "lora_b")].get_value())
    with pytest.raises(ValueError, match=r"'model/layers/0/attention/wo' has shape \[4, 16, 64\] there but \[4, 8"):
        initial_params(tmp_path / "lm", CFG.replace(hidden_size=32, head_dim=8), InternLM2ForRewardModel, mesh)


def test_objective_and_data_format_must_agree():
    exp = load_experiment(ROOT / "experiments" / "reward_tiny.py").config()
    with pytest.raises(ValueError, match="objective='dpo' does not go with data.format='messages'"):
        dataclasses.replace(exp, objective="dpo", data=DataConfig(format="messages", train_files=("a.jsonl",)))
    with pytest.raises(ValueError, match="unknown objective 'ppo'; registered: dpo, lm, orpo"):
        dataclasses.replace(exp, objective="ppo")
    with pytest.raises(ValueError, match="unknown data format 'sharegpt'; registered: alpaca, messages"):
        DataConfig(format="sharegpt")


def test_the_7b_sft_recipe_is_the_report_s():
    exp: Experiment = load_experiment(ROOT / "experiments" / "internlm2_7b_sft.py").config()
    assert exp.optimizer.peak_lr == 4e-5 and exp.objective.name == "lm" and exp.data.format == "messages"
    assert exp.model.num_params() == 7_737_708_544 and exp.train.init_weights
    tokens_per_epoch = 10_000_000 * 1_500
    assert exp.train.steps * exp.train.batch_size * exp.train.seq_len == pytest.approx(tokens_per_epoch, rel=1e-3)


# ---- the tiny experiments end to end (slow: a few minutes of CPU) -------------------------------------------------

@pytest.mark.slow
def test_reward_tiny_reaches_held_out_accuracy_well_above_chance(tmp_path):
    done = launch(ROOT / "experiments" / "reward_tiny.py", cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "runs/reward_tiny/reward_report.json").read_text())
    assert report["accuracy"] > 0.8 and report["conditional_flip_rate"] > 0.8 and report["hf_round_trip_exact"]
    assert (tmp_path / "runs/reward_tiny/score_histograms.png").stat().st_size > 10_000


@pytest.mark.slow
def test_dpo_tiny_after_sft_tiny_raises_the_preference_for_passing_code(tmp_path):
    done = launch(ROOT / "experiments" / "dpo_tiny.py", cwd=tmp_path, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "held-out loss" in done.stdout and "assistant:" in done.stdout  # sft_tiny ran first
    report = json.loads((tmp_path / "runs/dpo_tiny/dpo_report.json").read_text())
    assert report["preference_rate_after"] > report["preference_rate_before"] + 0.1
    assert report["eval_accuracy"] > 0.7


@pytest.mark.slow
@pytest.mark.parametrize("experiment, parameters", [("internlm2_7b_sft.py", "7,737,708,544"),
                                                    ("internlm2_7b_reward.py", "7,358,652,416")])
def test_7b_sft_and_reward_steps_compile_for_a_tpu_pod_slice(tmp_path, experiment, parameters):
    pytest.importorskip("libtpu", reason="libtpu (requirements-test.txt) provides the TPU compiler")
    done = launch(ROOT / "experiments" / experiment, "--compile-only", "--topology", "v5p:2x2x2",
                  "--set", "train.batch_size=8", "--set", "train.seq_len=4096", cwd=tmp_path, timeout=1200,
                  env_extra={"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"parameters: {parameters}" in done.stdout and "fits             True" in done.stdout
