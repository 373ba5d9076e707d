"""Supervised fine-tuning of the `tiny` preset on CPU in about a minute: chat conversations derived from the standard
library (explain-a-function chats, follow-ups with an untrained first answer, interpreter tool calls), packed whole
into rows, loss on assistant tokens only. The same step, state and
checkpoints as pretraining; `--set train.init_weights=<model or run directory>` starts from trained weights.

Run: python -m internlm2_jax.launch experiments/sft_tiny.py [--set model.lora.rank=8 ...]
"""

import json
from pathlib import Path

from internlm2_jax.config import preset
from internlm2_jax.recipes.finetune_data import (docstring_conversations, doctest_pairs, train_finetune_tokenizer,
                                                 write_jsonl)
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.run import run_training
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.train import OptimizerConfig
from internlm2_jax.train.loop import TrainConfig

RUN = Path("runs/sft_tiny")
DATA = RUN / "data"


def config() -> Experiment:
    return Experiment(
        name="sft_tiny",
        model=preset("tiny", vocab_size=1024, max_position_embeddings=512),
        train=TrainConfig(steps=120, batch_size=8, seq_len=512, log_every=10, checkpoint_every=60, run_dir=str(RUN)),
        optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=10, total_steps=120, weight_decay=0.0),
        mesh=MeshConfig(fsdp=-1),  # every device there is
        data=DataConfig(format="messages", train_files=(str(DATA / "train.jsonl"),),
                        heldout_files=(str(DATA / "heldout.jsonl"),), tokenizer=str(DATA / "tokenizer.model"),
                        eval_batches=8))


def prepare_data(vocab_size: int) -> None:
    train, heldout = docstring_conversations(3000, seed=0), docstring_conversations(200, seed=1)
    write_jsonl(train, DATA / "train.jsonl")
    write_jsonl(heldout, DATA / "heldout.jsonl")
    # dpo_tiny continues from this run with this tokenizer on complete-the-doctest pairs: it knows their words too.
    train_finetune_tokenizer(train[::3] + doctest_pairs(300, seed=5), vocab_size, DATA / "tokenizer.model")


def main(exp: Experiment) -> None:
    from internlm2_jax.decode.generate import generate
    from internlm2_jax.tokenizer import Tokenizer
    from internlm2_jax.artifacts import load_run

    if not (Path(exp.data.tokenizer)).exists():
        prepare_data(exp.model.vocab_size)
    result = run_training(exp)
    _, model, _ = load_run(result.run_dir)
    tokenizer = Tokenizer.from_file(exp.data.tokenizer)
    question = json.loads(open(exp.data.heldout_files[0], encoding="utf-8").readline())["messages"][:1]
    reply = generate(model, tokenizer, [question], max_new_tokens=48)[0].text
    print(f"step {result.final_step}: held-out loss {result.eval['eval_loss']:.3f} on assistant tokens\n"
          f"user: {question[0]['content']}\nassistant: {reply}")
