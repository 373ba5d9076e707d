"""Pretraining: the training state, the pure jitted steps, the loss, the optimizer, checkpoints, the loop."""

from internlm2_jax.train.loss import next_token_loss
from internlm2_jax.train.optim import OptimizerConfig, lr_schedule, make_optimizer
from internlm2_jax.train.state import TrainState, abstract_train_state, init_train_state, train_state_shardings
from internlm2_jax.train.step import StepConfig, jit_eval_step, jit_train_step, make_eval_step, make_train_step

__all__ = ["OptimizerConfig", "StepConfig", "TrainState", "abstract_train_state", "init_train_state",
           "jit_eval_step", "jit_train_step", "lr_schedule", "make_eval_step", "make_optimizer", "make_train_step",
           "next_token_loss", "train_state_shardings"]
