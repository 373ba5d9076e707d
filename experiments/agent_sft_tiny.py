"""A tiny model trained on oracle trajectories multiplies by writing the program (docs/agents.md §4.6).

Data: 4-digit × 3-digit products (`agents.tasks` suite "arith_mul", difficulty 3, training seeds < 10**6). Each
question is written twice: as an agent trajectory (the interpreter announced; a thought, an interpreter call, the
sandbox's real output, "The answer is \\boxed{c}.", about 10% with a planted bug and its real traceback first) and as
a direct answer (the interpreter not announced), plus control questions answered without a call. The trajectories
come from `agents.trajectories.oracle_records`: the oracle policy through the real loop and sandbox, so the records
render exactly as the evaluation's prompts will.

One SFT run, then held-out questions (evaluation seeds >= 10**9, and one digit more as out-of-distribution) answered
by the same model twice through the in-process engine: directly (the interpreter not announced, calls banned) and
through the agent loop with the sandboxed interpreter. A model this small cannot multiply in its head, so direct
accuracy stays near 0; copying the operands into `print(a * b)` and the output into the answer is learnable. A third
pass runs the agent with an interpreter that lies (shows c + 1): answers that follow the lie show the model reads its
tool's output; a fourth renders every prompt without the interpreter's results, and accuracy collapses. The report
(`runs/agent_sft_tiny/report.json`, `.md`) gives accuracy, parse- and exec-error rates, tool rate and mean turns of
each mode.

Run: python -m internlm2_jax.launch experiments/agent_sft_tiny.py
"""

import dataclasses
import json
import time
from pathlib import Path

from internlm2_jax.agents.clients import Decoding, EngineClient, Prompt
from internlm2_jax.agents.loop import AgentConfig, run_agents
from internlm2_jax.agents.protocol import ToolResult
from internlm2_jax.agents.state import Limits
from internlm2_jax.agents.tasks import EVAL_SEED_START, generate
from internlm2_jax.agents.tasks.oracle import RETRY_THOUGHT, THOUGHTS, answer_text, extract_answer
from internlm2_jax.agents.tools import PythonTool, ToolExecutor
from internlm2_jax.agents.trajectories import dedup, oracle_records, write_records
from internlm2_jax.artifacts import load_run
from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.config import preset
from internlm2_jax.decode.engine import Engine, EngineConfig
from internlm2_jax.experiment import DataConfig, Experiment
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.recipes.finetune_data import train_finetune_tokenizer
from internlm2_jax.run import run_training
from internlm2_jax.tokenizer import Tokenizer
from internlm2_jax.train import OptimizerConfig
from internlm2_jax.train.loop import TrainConfig

RUN = Path("runs/agent_sft_tiny")
DATA = RUN / "data"
SUITE, DIFFICULTY = "arith_mul", 3  # 4-digit × 3-digit products
# A one-line interpreter prompt: the released one is ~150 tokens, which a tiny model only pays for in speed.
PROMPT = "You can run Python code."
# One thought sentence: the question's digits then sit at one distance from where the program copies them, which a
# tiny model learns reliably; with several (different lengths) it must find them by content, and often does not.
THOUGHT = THOUGHTS[0]
AGENT = AgentConfig(limits=Limits(max_turns=4), decoding=Decoding(max_new_tokens=40), interpreter_prompt=PROMPT)


@dataclasses.dataclass(frozen=True)
class Sizes:
    train: int = 3000  # training questions (each a trajectory and a direct answer)
    controls: int = 300  # no-tool questions with the interpreter announced
    heldout: int = 200  # evaluation questions, in distribution
    ood: int = 100  # evaluation questions with one digit more


def config() -> Experiment:
    steps = 600
    return Experiment(
        name="agent_sft_tiny",
        # Wider than `tiny` (64): copying seven digits twice per answer needs the room. A short context, so a short
        # RoPE wavelength range keeps neighbouring positions distinguishable.
        model=preset("tiny", vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                     head_dim=32, max_position_embeddings=256, rope_theta=10_000.0),
        train=TrainConfig(steps=steps, batch_size=16, seq_len=256, log_every=50, checkpoint_every=steps,
                          run_dir=str(RUN)),
        optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=20, total_steps=steps, weight_decay=0.0),
        mesh=MeshConfig(fsdp=-1),  # every device there is
        data=DataConfig(format="messages", train_files=(str(DATA / "train.jsonl"),),
                        heldout_files=(str(DATA / "heldout.jsonl"),), tokenizer=str(DATA / "tokenizer.model"),
                        eval_batches=2))


def prepare_data(exp: Experiment, sizes: Sizes) -> dict:
    """Tokenizer, then the oracle's records through the real loop (the loop needs the tokenizer to encode turns),
    written where `exp.data` says."""
    problems = generate(SUITE, sizes.train, seed=0, difficulty=DIFFICULTY)
    controls = generate("control", sizes.controls, seed=0)
    texts = [{"q": p.question, "code": p.program, "a": answer_text(p.answer)} for p in problems + controls]
    texts.append({"prompt": PROMPT, "thoughts": f"{THOUGHT} {RETRY_THOUGHT}"})
    tokenizer = train_finetune_tokenizer(texts, exp.model.vocab_size, exp.data.tokenizer)
    stats: dict[str, int] = {}
    records = dedup(oracle_records(problems + controls, tokenizer, config=AGENT, thoughts=(THOUGHT,), stats=stats)
                    + oracle_records(problems, tokenizer, config=AGENT, interpreter=False, stats=stats))
    write_records(records, exp.data.train_files[0])
    heldout = generate(SUITE, 64, seed=1, difficulty=DIFFICULTY)
    write_records(oracle_records(heldout, tokenizer, config=AGENT, thoughts=(THOUGHT,)) +
                  oracle_records(heldout, tokenizer, config=AGENT, interpreter=False), exp.data.heldout_files[0])
    return {"train_records": len(records), **stats}


class LyingInterpreter(PythonTool):
    """The causality check of agents.md §4.6: where a program prints an integer c, the model is shown c + 1. An
    agent that reads its tool's output answers c + 1; one that answers from memorised patterns does not."""

    def __call__(self, code: str) -> ToolResult:
        result = super().__call__(code)
        printed = result.stdout.strip()
        if result.status == "ok" and printed.lstrip("-").isdigit():
            return dataclasses.replace(result, stdout=f"{int(printed) + 1}\n")
        return result


class UnheardClient(EngineClient):
    """The other causality check of §4.6, a deliberately broken renderer: every prompt is rendered without its
    `environment` turns, so the model never sees what its program printed. An agent whose answers come from the
    tool collapses; one that computes them some other way would not."""

    def __init__(self, engine, tokenizer):
        super().__init__(engine)
        self.tokenizer, self.template = tokenizer, get_chat_template("internlm2_chat")

    def _request(self, prompt: Prompt, decoding: Decoding):
        heard = [m for m in prompt.messages if m["role"] != "environment"]
        ids, _ = self.template.encode(heard, self.tokenizer, add_generation_prompt=True)
        return super()._request(dataclasses.replace(prompt, ids=tuple(ids)), decoding)


def evaluate(engine, tokenizer, problems, *, mode: str) -> dict:
    """Accuracy and the loop's error rates over `problems`, answered through the agent loop on `engine`: "agent"
    with the interpreter, "direct" without (no interpreter announced, one turn, so calls are banned), "lying" with
    `LyingInterpreter`, where the accuracy counted is that of the lie (answers equal to c + 1), "unheard" with the
    interpreter's results left out of every prompt (`UnheardClient`)."""
    expected = [str(int(p.answer) + 1) if mode == "lying" else p.answer for p in problems]
    if mode != "direct":
        interpreter = LyingInterpreter if mode == "lying" else PythonTool
        config, executors = AGENT, lambda: ToolExecutor(interpreter=interpreter())
    else:
        config, executors = dataclasses.replace(AGENT, limits=Limits(max_turns=1)), ToolExecutor()
    client = UnheardClient(engine, tokenizer) if mode == "unheard" else EngineClient(engine)
    start = time.perf_counter()
    results = run_agents(client, tokenizer, executors, [p.question for p in problems], config=config)
    seconds = time.perf_counter() - start
    correct = [extract_answer(r.answer) == answer for r, answer in zip(results, expected, strict=True)]
    turns = sum(len(r.turns) for r in results)
    calls = [result for r in results for _, result in r.calls]
    return {"n": len(problems), "accuracy": sum(correct) / len(problems),
            "parse_error_rate": sum(r.state.parse_errors for r in results) / max(turns, 1),
            "exec_error_rate": sum(c.status != "ok" for c in calls) / max(len(calls), 1),
            "tool_rate": sum(bool(r.calls) for r in results) / len(problems),
            "no_answer_rate": sum(r.answer is None for r in results) / len(problems),
            "mean_turns": turns / len(problems), "seconds": seconds,
            "examples": [{"question": p.question, "answer": p.answer, "correct": ok,
                          "messages": [dict(m) for m in r.messages if m["role"] != "system"]}
                         for p, r, ok in list(zip(problems, results, correct, strict=True))[:3]]}


def run(exp: Experiment, sizes: Sizes = Sizes()) -> dict:
    """Data (once), SFT, the evaluations; writes and returns the report."""
    timings = {}
    start = time.perf_counter()
    data = prepare_data(exp, sizes) if not Path(exp.data.tokenizer).exists() else {}
    timings["data_s"] = time.perf_counter() - start
    start = time.perf_counter()
    result = run_training(exp)
    timings["train_s"] = time.perf_counter() - start
    _, model, _ = load_run(result.run_dir)
    tokenizer = Tokenizer.from_file(exp.data.tokenizer)
    max_len, rows = exp.model.max_position_embeddings, 64
    engine = Engine(model, tokenizer, EngineConfig(max_model_len=max_len, kv_budget_tokens=rows * max_len,
                                                   max_running=rows, prefill_chunk=max_len))
    sets = {"heldout": generate(SUITE, sizes.heldout, EVAL_SEED_START, difficulty=DIFFICULTY)}
    if sizes.ood:
        sets["ood"] = generate(SUITE, sizes.ood, EVAL_SEED_START, difficulty=DIFFICULTY + 1)
    report = {"suite": SUITE, "difficulty": DIFFICULTY, "steps": result.final_step,
              "eval_loss": result.eval.get("eval_loss"), "data": data, "timings": timings}
    for name, problems in sets.items():
        for mode in ("direct", "agent", "lying", "unheard") if name == "heldout" else ("direct", "agent"):
            report[f"{name}_{mode}"] = evaluate(engine, tokenizer, problems, mode=mode)
    report["margin"] = report["heldout_agent"]["accuracy"] - report["heldout_direct"]["accuracy"]
    write_report(report, Path(exp.train.run_dir))
    return report


def write_report(report: dict, run_dir: Path) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    rows = [f"| {key.replace('_', ' ')} | {m['n']} | {m['accuracy']:.3f} | {m['parse_error_rate']:.3f} | "
            f"{m['exec_error_rate']:.3f} | {m['tool_rate']:.3f} | {m['mean_turns']:.2f} | {m['seconds']:.1f} |"
            for key, m in report.items() if isinstance(m, dict) and "accuracy" in m]
    (run_dir / "report.md").write_text(
        f"# Agent SFT on {report['suite']} (difficulty {report['difficulty']}): direct vs interpreter\n\n"
        f"{report['steps']} SFT steps; held-out loss {report['eval_loss']}; agent − direct accuracy "
        f"{report['margin']:+.3f}.\n\n"
        "| set and mode | n | accuracy | parse errors | exec errors | tool rate | mean turns | seconds |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def main(exp: Experiment) -> None:
    report = run(exp)
    print(f"held-out accuracy: direct {report['heldout_direct']['accuracy']:.3f}, "
          f"agent {report['heldout_agent']['accuracy']:.3f} (report in {exp.train.run_dir}/report.md)")
