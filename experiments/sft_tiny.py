"""Supervised fine-tuning of the `tiny` preset on CPU in about a minute: chat conversations derived from the standard
library (explain-a-function chats, follow-ups with an untrained first answer, interpreter tool calls), packed whole
into rows, loss on assistant tokens only. The same step, state and
checkpoints as pretraining; `--set train.init_weights=<model or run directory>` starts from trained weights.

`stage(exp)` is the run and its one number: the share of held-out first questions whose greedy reply follows the chat
format (ends with `<|im_end|>`; a computation request answered by an interpreter call whose code compiles, an
explain-a-function question by a one-line sentence), before SFT (the weights the run starts from) and after.
`make demo` (experiments/tiny_chain.py) runs this stage as it is.

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
FORMAT_PROMPTS = 48  # held-out first questions the format share is measured on


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


def prepare_data(vocab_size: int, data_dir: Path = DATA) -> None:
    train, heldout = docstring_conversations(3000, seed=0), docstring_conversations(200, seed=1)
    write_jsonl(train, data_dir / "train.jsonl")
    write_jsonl(heldout, data_dir / "heldout.jsonl")
    # dpo_tiny continues from this run with this tokenizer on complete-the-doctest pairs: it knows their words too.
    train_finetune_tokenizer(train[::3] + doctest_pairs(300, seed=5), vocab_size, data_dir / "tokenizer.model")


def follows_format(question: str, completion, tokenizer) -> bool:
    """Whether a reply to `question` is in the format its training conversations answer in: it ends with
    `<|im_end|>`, parses, and is an interpreter call whose code compiles for a computation request, a one-line
    sentence (three words or more, a full stop) without a call otherwise."""
    from internlm2_jax.agents.protocol import parse_ids

    if not completion.tokens or completion.tokens[-1] != tokenizer.token_id("<|im_end|>"):
        return False
    parsed = parse_ids(completion.tokens[:-1], tokenizer)
    if parsed.error is not None:
        return False
    if question.startswith("Use Python to compute"):  # docstring_conversations' tool-call questions
        if parsed.call is None or parsed.call.kind != "interpreter":
            return False
        try:
            compile(parsed.call.arguments["code"], "<reply>", "exec")
        except (SyntaxError, ValueError):  # ValueError: a null byte in the code
            return False
        return True
    content = parsed.content.strip()  # a docstring's first line: a sentence of a few words
    return parsed.call is None and "\n" not in content and len(content.split()) >= 3 and content.endswith(".")


def format_share(model, tokenizer, questions: list[str], max_new_tokens: int = 48) -> tuple[float, list[dict]]:
    """The share of greedy replies to `questions` (first user turns) that `follows_format`, and three examples."""
    from internlm2_jax.decode.generate import generate

    completions = generate(model, tokenizer, [[{"role": "user", "content": q}] for q in questions],
                           max_new_tokens=max_new_tokens)
    ok = [follows_format(q, c, tokenizer) for q, c in zip(questions, completions, strict=True)]
    examples = [{"user": q, "assistant": tokenizer.decode(c.tokens), "follows_format": o}
                for q, c, o in list(zip(questions, completions, ok, strict=True))[:3]]
    return sum(ok) / len(ok), examples


def stage(exp: Experiment, *, progress: bool = True) -> dict:
    """Data (once), the format share of the starting weights, SFT, the share after; the held-out loss."""
    from flax import nnx

    from internlm2_jax.artifacts import load_model, load_run
    from internlm2_jax.model import InternLM2ForCausalLM
    from internlm2_jax.tokenizer import Tokenizer

    if not Path(exp.data.tokenizer).exists():
        prepare_data(exp.model.vocab_size, Path(exp.data.tokenizer).parent)
    tokenizer = Tokenizer.from_file(exp.data.tokenizer)
    records = [json.loads(line) for line in open(exp.data.heldout_files[0], encoding="utf-8")]
    questions = [r["messages"][0]["content"] for r in records[:FORMAT_PROMPTS]]
    start = (load_model(exp.train.init_weights)[1] if exp.train.init_weights
             else InternLM2ForCausalLM(exp.model, rngs=nnx.Rngs(exp.train.seed)))
    before, _ = format_share(start, tokenizer, questions)
    result = run_training(exp, progress=progress)
    _, model, _ = load_run(result.run_dir)
    after, examples = format_share(model, tokenizer, questions)
    out = {"steps": result.final_step, "heldout_loss": result.eval["eval_loss"], "prompts": len(questions),
           "format_share_before": before, "format_share_after": after, "examples": examples}
    (result.run_dir / "sft_report.json").write_text(json.dumps(out, indent=2, ensure_ascii=False))
    return out


def main(exp: Experiment) -> None:
    out = stage(exp)
    example = out["examples"][0]
    print(f"step {out['steps']}: held-out loss {out['heldout_loss']:.3f} on assistant tokens; replies in the chat "
          f"format {out['format_share_before']:.2f} -> {out['format_share_after']:.2f} of {out['prompts']} held-out "
          f"questions\nuser: {example['user']}\nassistant: {example['assistant']}")
