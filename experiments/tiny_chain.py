"""`make demo`: the InternLM2 chain in miniature on 2 CPU cores in under 10 minutes, each stage one number that moves.

1. Curation: Python standard library source (real code, on every machine) with a held-out split -> our own 8K
   tokenizer -> clean -> dedup -> code-quality tiers -> the weighted mixture manifest (the stage table).
2. Pretraining: a ~10M-parameter InternLM2 on the curated mixture; held-out perplexity against an add-one unigram
   model fitted on the training split; the loss curve.
3. SFT (`sft_tiny.stage`): the share of held-out questions answered in the chat format, before and after.
4. Conditional reward model (`reward_tiny.stage`): held-out pairwise accuracy, and how often the margin of a detailed
   answer over a refusal flips sign with the domain system prompt, before and after.
5. RLHF (`ppo_tiny.run_rl` with `grpo_tiny.rl_config`, or PPO): held-out pass@1 on complete-the-doctest from an SFT
   policy trained on noisy demonstrations, before and after, with the KL to that SFT policy.
6. Agent (`agent_sft_tiny.run`): held-out 4-digit x 3-digit products answered directly and through the sandboxed
   interpreter by the same trajectory-tuned model.
7. Evaluation: the summary table of the stages' held-out results with the hash of each held-out setting.
8. Deployment: the SFT stage's chat model exported to a model directory, served (`python -m internlm2_jax.serve`) and
   asked a held-out question through the openai client, against the same question answered in-process.

Each stage after pretraining trains its own tiny model for its task (its own tokenizer and data), through the same
public function its experiment's `main` runs, only with fewer steps (`chain.*`): the chain has no code path of its
own. The report (`runs/tiny_chain/report.md`, PNGs beside it) starts with the table stage / metric / before / after /
what you just saw; every stage writes its own files under `runs/tiny_chain/<stage>/`.

Run: python -m internlm2_jax.launch experiments/tiny_chain.py [--set chain.stages=curation,pretraining ...]
"""

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import jax
from flax import nnx

from internlm2_jax.config import ModelConfig, RopeScaling
from internlm2_jax.data import PretrainDataIterator
from internlm2_jax.data.curation.report import format_report
from internlm2_jax.eval.tasks import suite_table
from internlm2_jax.experiment import DataConfig, Experiment, load_experiment
from internlm2_jax.model import model_graphdef
from internlm2_jax.model.quantize import quantize_int8, weight_bytes
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.recipes.rl_tasks import BODY_RULE
from internlm2_jax.recipes.stdlib_data import prepare_stdlib_dataset
from internlm2_jax.run import run_training
from internlm2_jax.train import OptimizerConfig, StepConfig
from internlm2_jax.train.loop import TrainConfig
from internlm2_jax.train.loss import next_token_loss

HERE = Path(__file__).parent
SFT = load_experiment(HERE / "sft_tiny.py")
RM = load_experiment(HERE / "reward_tiny.py")
PPO = load_experiment(HERE / "ppo_tiny.py")
GRPO = load_experiment(HERE / "grpo_tiny.py")
AGENT = load_experiment(HERE / "agent_sft_tiny.py")

RUN = Path("runs/tiny_chain")
STAGES = ("curation", "pretraining", "sft", "reward", "rlhf", "agent", "evaluation", "deployment")


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    """Which stages run and how long each trains; `--set chain.sft_steps=20` etc. shorten them."""

    stages: tuple[str, ...] = STAGES
    sft_steps: int = 100
    reward_steps: int = 60
    rlhf_algorithm: Literal["grpo", "ppo"] = "grpo"
    rlhf_sft_steps: int = 250  # the noisy-demonstration SFT the RL starts from
    rlhf_iterations: int = 20
    rlhf_eval_prompts: int = 64  # held-out prompts x 2 samples, before and after
    # agent_sft_tiny trains 600 steps at 3e-3 (0.735 through the interpreter); 320 at 5e-3 reached 0.44 and 0.59 in
    # two runs, 260 reached 0.00 (the numbers were right, copied wrong into the code): fewer is a cliff
    agent_steps: int = 320
    agent_peak_lr: float = 5e-3
    agent_heldout: int = 64


@dataclasses.dataclass(frozen=True)
class ChainExperiment(Experiment):
    """The pretraining stage's experiment (the top-level fields, as before) and the chain's stages."""

    chain: ChainConfig = ChainConfig()


@dataclasses.dataclass
class StageResult:
    stage: str
    metric: str
    before: str
    after: str
    saw: str  # one line: what the numbers show
    seconds: float = 0.0
    details: list[str] = dataclasses.field(default_factory=list)  # the stage's section of the report
    heldout: list[dict] = dataclasses.field(default_factory=list)  # suite_table rows for the evaluation stage


def config() -> ChainExperiment:
    # 4 layers, 16-row batches, 100 steps: pretraining is the stage that sets the chain's length (8 layers x 32 rows
    # x 150 steps took 579 s of a 16:38 run on the idle 2-core machine; this shape is ~1.2 s a step)
    model = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                        rope_theta=50_000.0, rope_scaling=RopeScaling("dynamic", 2.0), dtype="bfloat16")
    steps = 100
    return ChainExperiment(
        name="tiny_chain", model=model,
        train=TrainConfig(steps=steps, batch_size=16, seq_len=128, log_every=10, checkpoint_every=steps,
                          run_dir=str(RUN)),
        optimizer=OptimizerConfig(peak_lr=4e-3, warmup_steps=10, total_steps=steps, weight_decay=0.1),
        step=StepConfig(loss_chunk_size=128), mesh=MeshConfig(fsdp=-1),
        data=DataConfig(manifest=str(RUN / "data/train/manifest.json"),
                        heldout_manifest=str(RUN / "data/heldout/manifest.json"),
                        tokenizer=str(RUN / "data/tokenizer.model"), eval_batches=12))


def relocated(exp: Experiment, home: Path, *, steps: int, seed: int) -> Experiment:
    """A stage experiment's config with its run directory (and the data files under it) moved to `home`, `steps`
    training steps (the schedule and checkpoint with them) and the chain's seed."""
    old = Path(exp.train.run_dir)

    def move(path: str) -> str:
        return str(home / Path(path).relative_to(old)) if Path(path).is_relative_to(old) else path

    data = dataclasses.replace(exp.data, train_files=tuple(map(move, exp.data.train_files)),
                               heldout_files=tuple(map(move, exp.data.heldout_files)),
                               tokenizer=move(exp.data.tokenizer))
    train = dataclasses.replace(exp.train, run_dir=str(home), steps=steps, checkpoint_every=steps, seed=seed)
    optimizer = dataclasses.replace(exp.optimizer, total_steps=steps, warmup_steps=min(exp.optimizer.warmup_steps,
                                                                                      max(steps // 10, 1)))
    return dataclasses.replace(exp, data=data, train=train, optimizer=optimizer)


def heldout_hash(setting: dict[str, Any]) -> str:
    """10 hex digits naming a stage's held-out set and how it is prompted and scored (as `Task.prompt_hash`)."""
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:10]


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ---- 1-2: curation and pretraining -----------------------------------------------------------------------------

def unigram_nats(tokenizer, train_docs, heldout_docs) -> float:
    """Cross-entropy of an add-one unigram model fitted on the training split: the baseline to beat.

    Scored like the model: every token after <s> is predicted, </s> included.
    """
    counts = Counter()
    for d in train_docs:
        counts.update([*tokenizer.encode(d.text, allow_special=False), tokenizer.eos_id])
    total, vocab = sum(counts.values()), tokenizer.vocab_size
    nll = n = 0
    for d in heldout_docs:
        ids = [*tokenizer.encode(d.text, allow_special=False), tokenizer.eos_id]
        nll -= sum(math.log((counts[i] + 1) / (total + vocab)) for i in ids)
        n += len(ids)
    return nll / n


def heldout_loss(model, exp: Experiment, tokenizer) -> float:
    """Mean loss over the run's own evaluation batches (the rows `run_training` evaluated, in order)."""
    rows = PretrainDataIterator(exp.data.heldout_manifest, tokenizer, exp.train.seq_len, exp.train.batch_size,
                                seed=0, shuffle=False, repeat=False)
    loss = jax.jit(lambda m, batch: next_token_loss(m, batch, chunk_size=exp.step.loss_chunk_size))
    sums = [loss(model, batch) for batch in itertools.islice(rows, exp.data.eval_batches)]
    return sum(float(s) for s, _ in sums) / sum(float(n) for _, n in sums)


def curation_stage(exp: Experiment):
    data_dir = Path(exp.data.tokenizer).parent  # the manifests are data_dir/{train,heldout}/manifest.json
    dataset = prepare_stdlib_dataset(data_dir, exp.model.vocab_size)
    report = dataset.curation.report
    removed = {k: v for s in report["stages"] for k, v in s["removed_because"].items()}
    high = next((t for t in report["tiers"] if t["tier"] == "high"), None)
    saw = (f"{removed.get('empty', 0)} empty and {removed.get('max_generated_markers', 0)} generated files out, "
           f"{removed.get('exact_duplicate', 0) + removed.get('near_duplicate', 0)} duplicates, "
           f"{removed.get('tier_low', 0)} low-quality files dropped"
           + (f"; high tier x{high['epochs']:g} = {high['mixture_share']:.0%} of the mixture" if high else ""))
    result = StageResult("curation", "stdlib files in the training mixture", str(report["stages"][0]["docs_in"]),
                         str(report["output"]["docs"]), saw,
                         details=[f"Curation ({dataset.curation.output_dir}):", "", format_report(report)])
    return dataset, result


def pretraining_stage(exp: Experiment, dataset) -> StageResult:
    tokenizer = dataset.tokenizer
    result = run_training(exp)
    baseline = unigram_nats(tokenizer, dataset.train, dataset.heldout)
    fp32_graphdef, _ = model_graphdef(exp.model.replace(dtype="float32"))
    fp32 = nnx.merge(fp32_graphdef, result.state.params)
    int8 = quantize_int8(fp32)
    fp32_loss, int8_loss = heldout_loss(fp32, exp, tokenizer), heldout_loss(int8, exp, tokenizer)
    losses, loss = result.losses, result.eval["eval_loss"]
    if not loss < baseline:
        raise SystemExit(f"held-out loss {loss:.3f} did not beat the unigram baseline {baseline:.3f}")
    details = [
        f"Pretraining: {exp.model.num_params() / 1e6:.1f}M parameters, {result.final_step} steps of "
        f"{exp.train.batch_size}x{exp.train.seq_len} tokens ({result.run_dir / 'loss_curve.png'})", "",
        "| metric | value |", "|---|---|",
        f"| first / last train loss (nats/token) | {losses[min(losses)]:.3f} / {losses[max(losses)]:.3f} |",
        f"| held-out loss / perplexity | {loss:.3f} / {result.eval['eval_perplexity']:.1f} |",
        f"| unigram baseline loss / perplexity | {baseline:.3f} / {math.exp(baseline):.1f} |",
        f"| held-out perplexity, fp32 / int8 weights (decoding) | {math.exp(fp32_loss):.2f} / "
        f"{math.exp(int8_loss):.2f} ({math.exp(int8_loss - fp32_loss) - 1:+.2%}); weights "
        f"{weight_bytes(fp32) / 2**20:.1f} / {weight_bytes(int8) / 2**20:.1f} MiB |"]
    return StageResult(
        "pretraining", "held-out perplexity (stdlib code never trained on)",
        f"{math.exp(baseline):.0f} (unigram)", f"{result.eval['eval_perplexity']:.0f}",
        f"{math.exp(baseline - loss):.1f}x lower perplexity than token frequencies alone: it learned code's structure",
        details=details,
        heldout=[{"task": "stdlib-heldout", "prompt_hash": heldout_hash({"manifest": file_digest(
            exp.data.heldout_manifest), "seq_len": exp.train.seq_len, "batches": exp.data.eval_batches}),
            "mode": "ppl", "perplexity": result.eval["eval_perplexity"]}])


# ---- 3-6: the stage experiments, as their own mains run them -------------------------------------------------------

def sft_experiment(exp: ChainExperiment) -> Experiment:
    return relocated(SFT.config(), RUN / "sft", steps=exp.chain.sft_steps, seed=exp.train.seed)


def sft_stage(exp: ChainExperiment) -> StageResult:
    stage_exp = sft_experiment(exp)
    out = SFT.stage(stage_exp)
    example = out["examples"][0]
    return StageResult(
        "sft", f"held-out questions answered in the chat format (of {out['prompts']})",
        f"{out['format_share_before']:.2f}", f"{out['format_share_after']:.2f}",
        f"{example['user'].splitlines()[0]!r} -> {example['assistant']!r}",
        details=[f"SFT ({out['steps']} steps, held-out loss {out['heldout_loss']:.3f} on assistant tokens):", "",
                 f"    user: {example['user']!r}", f"    assistant: {example['assistant']!r}"],
        heldout=[{"task": "sft-chat-format", "prompt_hash": heldout_hash({
            "heldout": file_digest(stage_exp.data.heldout_files[0]), "prompts": out["prompts"],
            "template": "internlm2_chat", "decoding": "greedy"}), "mode": "gen",
            "accuracy": out["format_share_after"]}])


def reward_stage(exp: ChainExperiment) -> StageResult:
    stage_exp = relocated(RM.config(), RUN / "reward", steps=exp.chain.reward_steps, seed=exp.train.seed)
    out = RM.stage(stage_exp)
    before, after = out["before"], out["after"]
    margins = after["mean_margin_detailed_minus_refusal"]
    return StageResult(
        "reward", "held-out pairwise accuracy / margin flips with the domain prompt",
        f"{before['accuracy']:.2f} / {before['conditional_flip_rate']:.2f}",
        f"{after['accuracy']:.2f} / {after['conditional_flip_rate']:.2f}",
        f"the same answers, scored under two system prompts: detailed minus refusal {margins['helpful']:+.1f} "
        f"(helpful) vs {margins['harmless']:+.1f} (harmless)",
        details=[f"Conditional reward model ({out['steps']} steps, {after['heldout_pairs']} held-out pairs): accuracy "
                 f"by domain {json.dumps({k: round(v, 3) for k, v in after['accuracy_by_domain'].items()})}"],
        heldout=[{"task": "rm-pairs", "prompt_hash": heldout_hash({
            "heldout": file_digest(stage_exp.data.heldout_files[0]), "domains": "DOMAIN_PROMPTS"}),
            "mode": "score", "accuracy": after["accuracy"]}])


def rlhf_stage(exp: ChainExperiment) -> StageResult:
    chain = exp.chain
    sft_exp = relocated(PPO.config(), RUN / "rlhf_sft", steps=chain.rlhf_sft_steps, seed=exp.train.seed)
    module, critic = (GRPO, False) if chain.rlhf_algorithm == "grpo" else (PPO, True)
    cfg = dataclasses.replace(module.rl_config(RUN / "rlhf"), iterations=chain.rlhf_iterations,
                              checkpoint_every=chain.rlhf_iterations, seed=exp.train.seed)
    eval_kw = {"max_prompts": chain.rlhf_eval_prompts, "samples_per_prompt": 2}
    out = PPO.run_rl(sft_exp, cfg, reward_name=BODY_RULE, critic=critic, eval_kw=eval_kw)
    name = cfg.algorithm.upper()
    return StageResult(
        "rlhf", "held-out pass@1, complete-the-doctest (sampled; KL to SFT)", f"{out['pass_at_1_sft']:.2f}",
        f"{out['pass_at_1_rl']:.2f} (KL {out['heldout_mean_kl_to_sft']:.3f})",
        f"{name} from an SFT policy that imitates demonstrations right only half the time; after: "
        f"{shown(out['examples_rl'])}",
        details=[f"RLHF: {name}, {out['iterations']} iterations x {cfg.rows} samples in {out['rl_seconds']:.0f} s "
                 f"(exact-body reward, which agrees with the sandboxed doctest); per task after: "
                 f"{json.dumps({k: round(v, 2) for k, v in out['per_task_rl'].items()})}"],
        heldout=[{"task": "doctest-completion", "prompt_hash": heldout_hash({
            "heldout": file_digest(PPO.data_dir(sft_exp) / "rl_heldout.jsonl"), **eval_kw, "reward": BODY_RULE,
            "max_new_tokens": PPO.MAX_NEW_TOKENS, "temperature": 1.0}), "mode": "gen", "pass@1": out["pass_at_1_rl"]}])


def shown(examples: list[dict]) -> str:
    """One held-out RL sample (a rewarded one if there is one): the completed function's body and its reward."""
    example = next((e for e in examples if e["score"] > 0), examples[0])
    body = example["response"].strip().replace("\n", " ")[:60]
    return f"{body!r} (reward {example['score']:g})"


def transcript(messages: list[dict]) -> str:
    """An agent episode on one line: the question, each call's code, the tool's output, the answer."""
    parts = []
    for m in messages:
        if m.get("tool_call"):
            parts.append(m["tool_call"].get("code", json.dumps(m["tool_call"])))
        else:
            parts.append(m["content"])
    return " -> ".join(repr(p.strip()) for p in parts)


def agent_stage(exp: ChainExperiment) -> StageResult:
    base = AGENT.config()  # its data stay where agent_sft_tiny keeps them: the same records, made once
    stage_exp = relocated(base, RUN / "agent", steps=exp.chain.agent_steps, seed=exp.train.seed)
    stage_exp = dataclasses.replace(stage_exp, data=base.data,
                                    optimizer=dataclasses.replace(stage_exp.optimizer, peak_lr=exp.chain.agent_peak_lr))
    report = AGENT.run(stage_exp, AGENT.Sizes(heldout=exp.chain.agent_heldout, ood=0))
    direct, agent, lying = (report[f"heldout_{m}"] for m in ("direct", "agent", "lying"))
    setting = {"suite": AGENT.SUITE, "difficulty": AGENT.DIFFICULTY, "n": direct["n"], "agent": repr(AGENT.AGENT)}
    return StageResult(
        "agent", f"held-out 4x3-digit products right (of {direct['n']}): direct / through the interpreter",
        f"{direct['accuracy']:.2f}", f"{agent['accuracy']:.2f}",
        f"{transcript(agent['examples'][0]['messages'])}; with an interpreter that lies (shows the product + 1) "
        f"{lying['accuracy']:.2f} follow the lie",
        details=[f"Agent ({report['steps']} SFT steps on oracle trajectories; {stage_exp.train.run_dir}/report.md): "
                 f"tool rate {agent['tool_rate']:.2f}, parse errors {agent['parse_error_rate']:.3f}, exec errors "
                 f"{agent['exec_error_rate']:.3f}, mean turns {agent['mean_turns']:.2f}; answering directly: "
                 f"{transcript(direct['examples'][0]['messages'])}"],
        heldout=[{"task": "arith_mul-heldout", "prompt_hash": heldout_hash({**setting, "mode": mode}), "mode": mode,
                  "accuracy": report[f"heldout_{mode}"]["accuracy"]} for mode in ("direct", "agent")])


def evaluation_stage(results: list[StageResult]) -> StageResult:
    rows = [row for r in results for row in r.heldout]
    return StageResult("evaluation", "held-out sets scored", "-", str(len(rows)),
                       "one table of every stage's held-out result; equal prompt hashes = comparable scores",
                       details=["Evaluation (each held-out setting's hash covers its data and how it is prompted "
                                "and scored):", "", suite_table(rows)])


# ---- 8: deployment ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model_dir: Path, log_path: Path, *, api_key: str, timeout: float = 300):
    """`python -m internlm2_jax.serve` on `model_dir` in a subprocess; yields its base URL once /health answers."""
    import httpx

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "internlm2_jax.serve", "--checkpoint", str(model_dir),
                                 "--port", str(port), "--api-key", api_key, "--model-name", model_dir.name,
                                 "--max-model-len", "256", "--max-running", "2", "--prefill-chunk", "128",
                                 "--kv-budget-tokens", "1024", "--log-level", "warning", "--no-warmup"],
                                stdout=log, stderr=subprocess.STDOUT)
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited ({proc.returncode}); its log: {log_path}")
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer /health in {timeout:.0f} s; its log: {log_path}")
                time.sleep(0.5)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def deployment_stage(exp: ChainExperiment) -> StageResult:
    """The SFT stage's chat model exported to a model directory, served, and asked one held-out question through the
    openai client: the served reply against the in-process greedy one."""
    import openai

    from internlm2_jax.artifacts import load_run
    from internlm2_jax.convert import save_pretrained
    from internlm2_jax.decode.generate import generate
    from internlm2_jax.tokenizer import Tokenizer

    sft_exp, home = sft_experiment(exp), RUN / "deploy"
    tokenizer = Tokenizer.from_file(sft_exp.data.tokenizer)
    _, model, _ = load_run(sft_exp.train.run_dir)
    question = json.loads(Path(sft_exp.data.heldout_files[0]).read_text().splitlines()[0])["messages"][0]["content"]
    local = generate(model, tokenizer, [[{"role": "user", "content": question}]], max_new_tokens=48)[0].text
    model_dir = Path(save_pretrained(model, home / "tiny-chat", tokenizer=tokenizer))
    with serving(model_dir, home / "server.log", api_key="tiny-chain") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="tiny-chain", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=model_dir.name, temperature=0.0, max_tokens=48,
                                               messages=[{"role": "user", "content": question}])
    served = reply.choices[0].message.content or ""
    same = served.strip() == local.strip()
    return StageResult(
        "deployment", "a held-out question, greedy: in-process vs served (openai client)", f"{local.strip()!r}",
        f"{served.strip()!r}", f"exported to {model_dir}, served by `python -m internlm2_jax.serve`, answered "
        f"{'identically' if same else 'DIFFERENTLY'} through the OpenAI API",
        details=[f"Deployment: {question!r} -> {served!r} ({reply.usage.completion_tokens} tokens; server log "
                 f"{home / 'server.log'})"])


# ---- the report -------------------------------------------------------------------------------------------------

def summary_table(results: list[StageResult]) -> str:
    def cell(text: str) -> str:  # model output holds control tokens such as <|im_end|>: escape their bars
        return text.replace("|", "\\|")

    lines = ["| stage | metric | before | after | what you just saw | seconds |", "|---|---|---|---|---|---:|"]
    lines += [f"| {r.stage} | {cell(r.metric)} | {cell(r.before)} | {cell(r.after)} | {cell(r.saw)} | "
              f"{r.seconds:.0f} |" for r in results]
    return "\n".join(lines)


def plot_stages(results: list[StageResult], path: Path) -> None:
    """Before/after bars of the stages whose metric is a share (the first number of each cell)."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch

    shares = []
    for r in results:
        try:
            before, after = (float(cell.split()[0]) for cell in (r.before, r.after))
        except ValueError:
            continue
        if 0 <= before <= 1 and 0 <= after <= 1:
            shares.append((r.stage, before, after))
    if not shares:
        return
    fig = Figure(figsize=(1.6 * len(shares) + 1, 3))
    ax = fig.subplots()
    xs = range(len(shares))
    ax.bar([x - 0.2 for x in xs], [b for _, b, _ in shares], 0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [a for _, _, a in shares], 0.4, label="after")
    ax.set_xticks(list(xs), [s for s, _, _ in shares])
    ax.set_ylim(0, 1)
    ax.set_title("held-out, before and after each stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


STAGE_FUNCTIONS = {"sft": sft_stage, "reward": reward_stage, "rlhf": rlhf_stage, "agent": agent_stage,
                   "deployment": deployment_stage}


def main(exp: ChainExperiment) -> None:
    stages = exp.chain.stages
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"chain.stages: unknown {unknown}; the stages are {', '.join(STAGES)}")
    if "pretraining" in stages and "curation" not in stages:
        raise ValueError("chain.stages: pretraining trains on the curation stage's data; add curation")
    if "deployment" in stages and "sft" not in stages:
        raise ValueError("chain.stages: deployment serves the sft stage's chat model; add sft")
    RUN.mkdir(parents=True, exist_ok=True)
    results: list[StageResult] = []
    dataset = None
    for i, name in enumerate(s for s in STAGES if s in stages):
        print(f"\n=== stage {i + 1}/{len(stages)}: {name} ===", flush=True)
        start = time.perf_counter()
        if name == "curation":
            dataset, result = curation_stage(exp)
        elif name == "pretraining":
            result = pretraining_stage(exp, dataset)
        elif name == "evaluation":
            result = evaluation_stage(results)
        else:
            result = STAGE_FUNCTIONS[name](exp)
        result.seconds = time.perf_counter() - start
        results.append(result)
        print(f"=== {name}: {result.metric}: {result.before} -> {result.after} ({result.seconds:.0f} s) ===",
              flush=True)
    plot_stages(results, RUN / "stages.png")
    lines = [f"# {exp.name}: the InternLM2 chain in miniature ({sum(r.seconds for r in results):.0f} s of stages)",
             "", summary_table(results), ""]
    for r in results:
        lines += [*r.details, ""]
    lines.append("Figures: " + ", ".join(str(p) for p in sorted(RUN.rglob("*.png"))))
    report = "\n".join(lines)
    (RUN / "report.md").write_text(report)
    (RUN / "report.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2, default=str))
    print("\n" + report)
