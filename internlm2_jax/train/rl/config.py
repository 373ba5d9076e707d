"""The configuration of an online RL run (docs/rlhf.md §2.9): one frozen dataclass that the loop, the experiment
files and `--set` share. The formulas' knobs live in `RLLossConfig` (`loss`), the sampling ones in
`RolloutConfig` (`rollout`); everything that must agree between them, or divide the mesh, is checked here or at the
start of the run, never discovered as NaNs (verl #2505)."""

from __future__ import annotations

import dataclasses

from internlm2_jax.config import ConfigError
from internlm2_jax.decode.rollout import RolloutConfig
from internlm2_jax.train.rl.core import RLLossConfig
from internlm2_jax.train.rl.experience import ExperienceConfig
from internlm2_jax.train.rl.hacking import MonitorConfig
from internlm2_jax.train.rl.objectives import ACTOR_FIELDS

ALGORITHMS = ("ppo", "grpo")
ROLLOUT_WEIGHTS = ("gathered", "as_trained")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    algorithm: str = "ppo"  # "ppo": actor + critic (GAE); "grpo": group advantages, no critic
    iterations: int = 400  # rollout batches ([R]: ~200k queries in ~400 iterations)
    prompts_per_iteration: int = 512  # the prompt source's batch size
    rollout: RolloutConfig = RolloutConfig()
    loss: RLLossConfig = RLLossConfig()  # GRPO: RLLossConfig.grpo()
    ppo_epochs: int = 1  # passes over one experience batch ([X] policy_learn_time=1)
    minibatches: int = 1  # optimizer steps per epoch; GRPO groups are never split between them
    critic_warmup_iterations: int = 50  # [R]: critic-only iterations before the actor moves (PPO)
    ptx_coef: float = 0.5  # [R]: the pre-training loss's weight when PTX data is given (train_rl(ptx=...))
    seed: int = 0  # rollout keys and mini-batch shuffles derive from (seed, iteration[, epoch])
    chunk_size: int = 1024  # sequence chunk of the log-prob computations (bounds the fp32 logits)
    # The weights rollouts decode with: "gathered" reshards them once per iteration to ROLLOUT_RULES (whole over the
    # data axes, split by tensor, in the compute dtype: the "weight sync", §2.3), a copy per tensor-parallel group;
    # "as_trained" decodes with the training layout (no copy, but under FSDP an all-gather of every layer at every
    # token, and XLA keeps gathered weights in the decoding loop's temporaries: the 7B PPO rollout on v5p:2x2x2
    # peaks at 79.3 GiB/chip with it against 68.7 gathered, benchmarks/rl_aot.py).
    rollout_weights: str = "gathered"
    log_every: int = 1
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    dump_every: int = 0  # write samples/iter_{k}.jsonl every this many iterations (0: never)
    monitor: MonitorConfig = MonitorConfig()  # reward-hacking alerts (logged; stop the round on monitor.stop_round_on)
    # A model or run directory of the conditional reward model: `run.run_rl` scores with it (on spliced ids, under
    # each prompt's domain) and starts the critic from its trunk. None: the experiment gives its own reward source.
    reward_model: str | None = None
    run_dir: str = "runs/rl"

    def __post_init__(self):
        def need(ok, field, why):
            if not ok:
                raise ConfigError(f"rl.{field}={getattr(self, field)!r}: {why}")

        need(self.algorithm in ALGORITHMS, "algorithm", f"must be one of {ALGORITHMS}")
        need(self.rollout_weights in ROLLOUT_WEIGHTS, "rollout_weights", f"must be one of {ROLLOUT_WEIGHTS}")
        for name in ("iterations", "prompts_per_iteration", "ppo_epochs", "minibatches", "chunk_size", "log_every",
                     "checkpoint_every", "keep_checkpoints"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.critic_warmup_iterations >= 0, "critic_warmup_iterations", "must be >= 0")
        need(self.dump_every >= 0, "dump_every", "must be >= 0")
        need(self.ptx_coef >= 0, "ptx_coef", "must be >= 0")
        group = self.rollout.samples_per_prompt
        if self.algorithm == "grpo":
            need(group >= 2, "rollout", "GRPO needs rollout.samples_per_prompt >= 2 (a group of one has no "
                                        "baseline)")
            need(not (self.loss.kl_placement == "reward" and self.loss.kl_coef > 0), "loss",
                 "GRPO's group advantages see only the sequence score, so a per-token KL reward would be dropped: "
                 "use RLLossConfig.grpo() (k3 in the loss) or kl_coef=0")
            need(self.prompts_per_iteration % self.minibatches == 0, "minibatches",
                 f"GRPO keeps each prompt's {group} samples in one mini-batch, so the {self.prompts_per_iteration} "
                 "prompts must split evenly")
        need((self.prompts_per_iteration * group) % self.minibatches == 0, "minibatches",
             f"the {self.prompts_per_iteration * group} rows of an iteration do not split into that many")
        need(not (self.loss.kl_target is not None and self.loss.kl_placement == "loss"), "loss",
             "an adaptive KL coefficient (kl_target) is only applied to the KL reward (kl_placement='reward')")

    @property
    def rows(self) -> int:
        """Samples per iteration: prompts x samples per prompt."""
        return self.prompts_per_iteration * self.rollout.samples_per_prompt

    @property
    def group_size(self) -> int:
        return self.rollout.samples_per_prompt if self.algorithm == "grpo" else 1

    @property
    def experience(self) -> ExperienceConfig:
        """How `make_experience` runs for this config (static under jit)."""
        return ExperienceConfig(self.algorithm, self.rollout.temperature, group_size=self.group_size,
                                max_response_len=self.rollout.max_new_tokens, chunk_size=self.chunk_size)

    @property
    def actor_fields(self) -> tuple[str, ...]:
        """The fields of an actor mini-batch: GRPO's KL in the loss needs the reference log-probs too."""
        return ACTOR_FIELDS + (("ref_logp",) if self.loss.kl_placement == "loss" else ())
