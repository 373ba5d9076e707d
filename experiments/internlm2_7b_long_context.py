"""InternLM2-7B phase 2 (spec §5.4): continue the 4K run at 32K context with RoPE base 1,000,000 and a long-context
data mixture; weights, optimizer moments and the step count carry over from the phase-1 run (`train.init_from`).

The data manifest (`data/internlm2_long_context/manifest.json`) is built by
`internlm2_jax.recipes.long_context_data.build_long_context_manifest` from a curation run made with
`repositories=True`: the repository documents (each repository's files in import order), the curated documents of at
least 4096 tokens (up-weighted), and short curated documents as a replay share of half the tokens (spec §5.4: about
50% of this phase's data is <= 4K long). Count tokens with the tokenizer this run trains with:

python -m internlm2_jax.data.curate --input code:repos/ --input jsonl:web/ --set repositories=true \
    --set tokenizer=tokenizers/internlm2_tokenizer.model --output data/curated
python -m internlm2_jax.recipes.long_context_stdlib --curated data/curated --out data/internlm2_long_context \
    --tokenizer tokenizers/internlm2_tokenizer.model

(without `--curated`, the same command curates the Python standard library into that directory: the small real
corpus every machine has). Then:

python -m internlm2_jax.launch experiments/internlm2_7b_long_context.py --compile-only --topology v5p:4x4x4
"""

import dataclasses
from pathlib import Path

from internlm2_jax.experiment import DataConfig, Experiment, load_experiment

from internlm2_jax.run import run_training
from internlm2_jax.train.loop import TrainConfig

SEQ, BATCH_TOKENS, EXTRA_STEPS = 32768, 4 * 1024 * 1024, 50_000


def config() -> Experiment:
    phase1 = load_experiment(Path(__file__).with_name("internlm2_7b_pretrain.py")).config()
    steps = phase1.train.steps + EXTRA_STEPS
    return dataclasses.replace(
        phase1, name="internlm2_7b_long_context",
        model=phase1.model.replace(rope_theta=1_000_000.0, max_position_embeddings=SEQ),
        train=TrainConfig(steps=steps, batch_size=BATCH_TOKENS // SEQ, seq_len=SEQ, log_every=10,
                          checkpoint_every=500, run_dir="runs/internlm2_7b_long_context",
                          init_from=phase1.train.run_dir),
        optimizer=dataclasses.replace(phase1.optimizer, total_steps=steps),
        data=DataConfig(manifest="data/internlm2_long_context/manifest.json", tokenizer=phase1.data.tokenizer))


def main(exp: Experiment) -> None:
    run_training(exp)
