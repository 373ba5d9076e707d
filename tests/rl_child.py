"""A tiny PPO run in its own process, for the tests that kill, resume and split RL runs over processes.

    python tests/rl_child.py SPEC.json

The run is `internlm2_jax.train.rl.loop.train_rl` with the "tiny" preset, a random actor and critic, 8 fixed prompts
served in a rotating order, two samples each, and a rule reward on the host (the share of even ids in a response),
so that rollouts, rewards, experience, critic warm-up and mini-batched updates all run. SPEC (JSON) gives the run
directory, iterations, checkpoint interval, mesh, local CPU device count, optionally the `jax.distributed`
coordinator, process count and id (each process then serves its share of every prompt batch), a persistent
compilation cache and `iteration_delay_s` (a sleep before each prompt batch, so a watcher can kill the run at a chosen
iteration) and `dump_every` (sample dumps). The result (the metrics of every iteration this call ran) goes to
SPEC["out"] as JSON.

The parent side (starting, waiting for and signalling children) is `train_child.py`'s, with `script=` this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from train_child import Delayed, run_child, start_jax

PROMPTS, WIDTH, SAMPLES = 8, 6, 2
_rng = np.random.default_rng(0)
LENGTHS = _rng.integers(2, WIDTH + 1, PROMPTS).astype(np.int32)
PROMPT_IDS = np.where(np.arange(WIDTH)[None, :] < LENGTHS[:, None], _rng.integers(10, 500, (PROMPTS, WIDTH)),
                      0).astype(np.int32)


class Prompts:
    """The prompts rotated by one each batch; process p of n serves the p-th n-th of each batch."""

    def __init__(self, process_index: int = 0, process_count: int = 1):
        self.served, self.index, self.count = 0, process_index, process_count

    def __next__(self):
        from internlm2_jax.data.prompts import PromptBatch

        share = PROMPTS // self.count
        order = np.roll(np.arange(PROMPTS), self.served)[self.index * share:(self.index + 1) * share]
        self.served += 1
        return PromptBatch(PROMPT_IDS[order], LENGTHS[order], np.full(share, -1, np.int32), (None,) * share)

    def get_state(self):
        return {"served": self.served}

    def set_state(self, state):
        self.served = state["served"]


def even_share(batch, rollout) -> np.ndarray:
    """The share of even ids among each response's tokens: a reward every row earns differently."""
    tokens, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
    mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return ((tokens % 2 == 0) & mask).sum(1).astype(np.float32) / np.maximum(lengths, 1)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    jax = start_jax(spec)
    num_processes = int(spec.get("num_processes", 1))

    from internlm2_jax.config import preset
    from internlm2_jax.decode.rollout import RolloutConfig
    from internlm2_jax.parallel import MeshConfig
    from internlm2_jax.train import OptimizerConfig
    from internlm2_jax.train.rl.config import RLConfig
    from internlm2_jax.train.rl.core import RLLossConfig
    from internlm2_jax.train.rl.loop import train_rl
    from internlm2_jax.train.rl.state import ModelSetup

    prompts = Prompts(jax.process_index(), jax.process_count())
    source = Delayed(prompts, float(spec["iteration_delay_s"])) if spec.get("iteration_delay_s") else prompts
    cfg = RLConfig(iterations=int(spec["iterations"]), prompts_per_iteration=PROMPTS, minibatches=2,
                   rollout=RolloutConfig(max_new_tokens=4, samples_per_prompt=SAMPLES, stop_ids=(2,)),
                   loss=RLLossConfig(kl_coef=0.1, lam=0.95), critic_warmup_iterations=1, chunk_size=64,
                   checkpoint_every=int(spec.get("checkpoint_every", 1000)), keep_checkpoints=10,
                   dump_every=int(spec.get("dump_every", 0)),
                   run_dir=spec["run_dir"])
    optimizer = OptimizerConfig(peak_lr=1e-3, warmup_steps=0, total_steps=1000, weight_decay=0.0)
    print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
          f"{jax.device_count()} devices; RL to iteration {cfg.iterations}", flush=True)
    mesh = MeshConfig(*spec.get("mesh", [4, 2, 1, 1]))
    result = train_rl(cfg, ModelSetup(preset("tiny"), optimizer), source, even_share,
                      critic=ModelSetup(preset("tiny"), optimizer), mesh_cfg=mesh, progress=False)
    timeless = {str(k): {name: v for name, v in m.items() if not name.startswith("time/")
                         and name != "rollout_tokens_per_s"} for k, m in sorted(result.metrics.items())}
    out = {"process_index": jax.process_index(), "iterations": result.iterations, "interrupted": result.interrupted,
           "metrics": timeless, "served": prompts.served}
    Path(spec["out"]).write_text(json.dumps(out))
    print(f"process {jax.process_index()}: done at iteration {result.iterations}", flush=True)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    run_child(main)
