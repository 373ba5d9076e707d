"""Online RLHF (COOL RLHF's PPO and GRPO, docs/rlhf.md): the pure formulas (`core`), experience rows and their
advantages (`experience`), the actor/critic objectives that train through `make_train_step` (`objectives`,
registered as "ppo_actor" and "ppo_critic"), reward sources (`rewards`: the conditional RM on spliced ids, rules),
the run's configuration and state (`config`, `state`), the loop (`loop.train_rl`) and COOL's reward-hacking tooling
(`hacking`: monitors, patch pairs). The rollout is `decode/rollout.py`, the prompts `data/prompts.py`."""

from internlm2_jax.train.rl.core import (
    AdaptiveKL,
    RLLossConfig,
    RunningMoments,
    aggregate,
    aggregation_weights,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_controller,
    kl_estimate,
    last_response_position,
    masked_whiten,
    ppo_policy_loss,
    shape_scores,
    token_rewards,
    value_loss,
    weighted_sums,
)
from internlm2_jax.train.rl import experience, objectives  # noqa: F401  (importing registers ppo_actor, ppo_critic)

__all__ = ["AdaptiveKL", "RLLossConfig", "RunningMoments", "aggregate", "aggregation_weights", "entropy_from_logits",
           "gae", "group_advantages", "kl_controller", "kl_estimate", "last_response_position", "masked_whiten",
           "ppo_policy_loss", "shape_scores", "token_rewards", "value_loss", "weighted_sums"]
