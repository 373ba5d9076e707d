"""The InternLM2 model in Flax NNX."""

from internlm2_jax.model.attention import attention
from internlm2_jax.model.transformer import (
                                             InternLM2ForCausalLM,
                                             InternLM2ForRewardModel,
                                             InternLM2Model,
                                             last_token_scores,
                                             model_graphdef,
                                             token_logprobs,
)

__all__ = ["attention", "InternLM2ForCausalLM", "InternLM2ForRewardModel", "InternLM2Model", "last_token_scores",
           "model_graphdef", "token_logprobs"]
