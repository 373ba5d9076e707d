"""PPO on CPU beats the SFT ceiling: complete-the-doctest with a rule reward (docs/rlhf.md §3.6 item 2).

The SFT policy learns from noisy demonstrations (the correct body half the time, a plausible wrong one otherwise,
`recipes/rl_tasks.py`), so its sampled held-out pass@1 is about 0.5 by construction; more SFT on the same data
cannot raise it. PPO (actor and critic both started from that SFT run, the critic with a fresh value head, the
reference = the SFT weights) with a reward of 1 when the answer passes the prompt's doctest (run in the sandbox)
raises it. The report (`runs/ppo_tiny/rl_report.json` and `.md`) gives held-out pass@1 before and after, per task,
and the mean per-token KL to the SFT model; the loop's own curves are in `runs/ppo_tiny/rl_curves.png`.

`config()` holds both stages: the SFT one (`model`, `train`, `optimizer`, `data`; shared with `grpo_tiny`, run once:
`runs/rl_sft_tiny`) and the RL one (`rl`, `critic_optimizer`), so `--set rl.iterations=10` reaches the RL run. The
actor's optimizer is `actor_optimizer()` (a constant rate, not the SFT schedule).

Run: python -m internlm2_jax.launch experiments/ppo_tiny.py
"""

import dataclasses
import json
import time
from pathlib import Path

from internlm2_jax.config import preset
from internlm2_jax.decode.rollout import RolloutConfig
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.recipes.finetune_data import train_finetune_tokenizer, write_jsonl
from internlm2_jax.recipes.rl_tasks import noisy_demonstrations, rl_prompts
from internlm2_jax.run import run_training
from internlm2_jax.train import OptimizerConfig
from internlm2_jax.train.loop import TrainConfig
from internlm2_jax.train.rl.config import RLConfig
from internlm2_jax.train.rl.core import RLLossConfig

RUN = Path("runs/ppo_tiny")
SFT_RUN = Path("runs/rl_sft_tiny")
DATA = SFT_RUN / "data"
REWARD = "doctest"  # the sandboxed doctest; "correct_body" is the in-process exact proxy the CI test uses
MAX_PROMPT_LEN, MAX_NEW_TOKENS = 96, 24


def config() -> Experiment:
    """The SFT stage on noisy demonstrations, and the PPO run from it."""
    return Experiment(
        name="rl_sft_tiny",
        model=preset("tiny", vocab_size=1024, max_position_embeddings=256),
        train=TrainConfig(steps=400, batch_size=8, seq_len=256, log_every=20, checkpoint_every=400,
                          run_dir=str(SFT_RUN)),
        optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=10, total_steps=400, weight_decay=0.0),
        mesh=MeshConfig(fsdp=-1),  # every device there is
        data=DataConfig(format="messages", train_files=(str(DATA / "sft_train.jsonl"),),
                        heldout_files=(str(DATA / "sft_heldout.jsonl"),), tokenizer=str(DATA / "tokenizer.model"),
                        eval_batches=4),
        rl=rl_config(), critic_optimizer=critic_optimizer())


def rl_config(run_dir: Path = RUN) -> RLConfig:
    return RLConfig(
        algorithm="ppo", iterations=40, prompts_per_iteration=32,
        rollout=RolloutConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0),  # stop ids: main()
        loss=RLLossConfig(kl_coef=0.01),  # InternLM2's: k1 in the reward, running reward normalisation, lam 0.99
        ppo_epochs=2, minibatches=2, critic_warmup_iterations=2, log_every=1, checkpoint_every=20, dump_every=10,
        run_dir=str(run_dir))


def actor_optimizer() -> OptimizerConfig:
    return OptimizerConfig(peak_lr=3e-4, warmup_steps=1, total_steps=10**6, min_lr_ratio=1.0, weight_decay=0.0)


def critic_optimizer() -> OptimizerConfig:
    return OptimizerConfig(peak_lr=1e-3, warmup_steps=1, total_steps=10**6, min_lr_ratio=1.0, weight_decay=0.0)


def data_dir(exp: Experiment) -> Path:
    """Where the SFT stage's data lives (`DATA` as configured): beside its tokenizer, with the RL prompt files."""
    return Path(exp.data.tokenizer).parent


def prepare_data(exp: Experiment) -> None:
    """Noisy SFT chats, RL train prompts, held-out prompts (another seed) and a tokenizer that knows them."""
    train, data = noisy_demonstrations(2000, seed=0), data_dir(exp)
    write_jsonl(train, data / "sft_train.jsonl")
    write_jsonl(noisy_demonstrations(200, seed=1), data / "sft_heldout.jsonl")
    write_jsonl(rl_prompts(2000, seed=2), data / "rl_train.jsonl")
    write_jsonl(rl_prompts(128, seed=3), data / "rl_heldout.jsonl")
    train_finetune_tokenizer(train[:600], exp.model.vocab_size, exp.data.tokenizer)


def sft(exp: Experiment) -> None:
    if not Path(exp.data.tokenizer).exists():
        prepare_data(exp)
    if not (Path(exp.train.run_dir) / "checkpoints").exists():
        run_training(exp)


def evaluate(graphdef, params, exp: Experiment, tokenizer, reward, ref_params=None, **kw) -> dict:
    from internlm2_jax.recipes.rl_tasks import pass_at_1

    return pass_at_1(graphdef, params, data_dir(exp) / "rl_heldout.jsonl", tokenizer, reward=reward,
                     max_prompt_len=MAX_PROMPT_LEN, max_new_tokens=MAX_NEW_TOKENS, ref_params=ref_params, **kw)


def run_rl(exp: Experiment, cfg: RLConfig, *, reward_name: str = REWARD, critic: bool, eval_kw=None,
           progress: bool = True) -> dict:
    """SFT (if not done), held-out pass@1 of the SFT policy, RL from it, pass@1 and KL after; the report."""
    from flax import nnx

    from internlm2_jax.artifacts import load_run
    from internlm2_jax.data.prompts import PromptDataIterator
    from internlm2_jax.model import model_graphdef
    from internlm2_jax.tokenizer import Tokenizer
    from internlm2_jax.train.rl.loop import train_rl
    from internlm2_jax.train.rl.rewards import rule
    from internlm2_jax.train.rl.state import ModelSetup

    sft(exp)
    tokenizer = Tokenizer.from_file(exp.data.tokenizer)
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, stop_ids=tuple(tokenizer.stop_ids)))
    reward = rule(reward_name, tokenizer)
    eval_kw = eval_kw or {}
    _, sft_model, _ = load_run(exp.train.run_dir)
    graphdef, sft_params = nnx.split(sft_model)
    before = evaluate(graphdef, sft_params, exp, tokenizer, reward, **eval_kw)
    print(f"SFT policy: held-out pass@1 {before['pass_at_1']:.3f}")

    prompts = PromptDataIterator([str(data_dir(exp) / "rl_train.jsonl")], tokenizer, MAX_PROMPT_LEN,
                                 cfg.prompts_per_iteration, seed=cfg.seed)
    actor = ModelSetup(exp.model, actor_optimizer(), init_weights=exp.train.run_dir)
    critic_setup = ModelSetup(exp.model, exp.critic_optimizer or critic_optimizer(),
                              init_weights=exp.train.run_dir) if critic else None
    start = time.perf_counter()
    result = train_rl(cfg, actor, prompts, reward, critic=critic_setup, mesh_cfg=exp.mesh, pad_id=tokenizer.pad_id,
                      tokenizer=tokenizer, metadata={"sft_run": str(exp.train.run_dir), "reward": reward_name},
                      progress=progress)
    rl_seconds = time.perf_counter() - start

    policy_graphdef, _ = model_graphdef(exp.model)
    after = evaluate(policy_graphdef, result.state.actor.params, exp, tokenizer, reward, ref_params=sft_params,
                     **eval_kw)
    logged = {}  # the loop's metrics, from its log: a rerun of a finished run trains no iteration but still reports
    for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        logged[row["step"]] = row
    last = [logged[i] for i in sorted(logged)[-5:]]
    mean = lambda key: sum(m[key] for m in last) / len(last)  # noqa: E731
    report = {"algorithm": cfg.algorithm, "reward": reward_name, "iterations": result.iterations,
              "prompts_per_iteration": cfg.prompts_per_iteration, "samples_per_prompt": cfg.rollout.samples_per_prompt,
              "pass_at_1_sft": before["pass_at_1"], "pass_at_1_rl": after["pass_at_1"],
              "heldout_mean_kl_to_sft": after["mean_kl"], "train_kl_last_iterations": mean("kl"),
              "train_score_last_iterations": mean("score"), "rl_seconds": rl_seconds,
              "heldout_samples": after["samples"], "per_task_sft": before["per_task"],
              "per_task_rl": after["per_task"], "examples_rl": after["examples"]}
    run_dir = Path(cfg.run_dir)
    (run_dir / "rl_report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "rl_report.md").write_text(
        f"# {cfg.algorithm.upper()} on complete-the-doctest ({reward_name} reward)\n\n"
        f"| | SFT (noisy demos) | after {cfg.algorithm.upper()} |\n|---|---|---|\n"
        f"| held-out pass@1 (sampled, T=1) | {before['pass_at_1']:.3f} | {after['pass_at_1']:.3f} |\n"
        f"| mean per-token KL to SFT (held-out) | 0 | {after['mean_kl']:.4f} |\n\n"
        f"{result.iterations} iterations x {cfg.rows} samples in {rl_seconds:.0f} s; "
        f"per task after: {json.dumps({k: round(v, 2) for k, v in after['per_task'].items()})}\n")
    print(f"held-out pass@1: SFT {before['pass_at_1']:.3f} -> {cfg.algorithm.upper()} {after['pass_at_1']:.3f}, "
          f"mean per-token KL to SFT {after['mean_kl']:.4f} ({rl_seconds:.0f} s of RL)")
    return report


def main(exp: Experiment) -> None:
    run_rl(exp, exp.rl, critic=True)
