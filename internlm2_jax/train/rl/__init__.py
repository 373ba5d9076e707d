"""Online RLHF (COOL RLHF's PPO and GRPO, docs/rlhf.md): the pure formulas first; rollout, experience and loop later."""

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

__all__ = ["AdaptiveKL", "RLLossConfig", "RunningMoments", "aggregate", "aggregation_weights", "entropy_from_logits",
           "gae", "group_advantages", "kl_controller", "kl_estimate", "last_response_position", "masked_whiten",
           "ppo_policy_loss", "shape_scores", "token_rewards", "value_loss", "weighted_sums"]
