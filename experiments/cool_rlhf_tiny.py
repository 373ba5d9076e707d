"""COOL RLHF on CPU: PPO follows the conditional reward model's domain, which only the reward model sees
(docs/rlhf.md §1.11, §3.6 item 3).

`reward_tiny`'s conditional RM (run first if `runs/reward_tiny/checkpoints` is missing) prefers the detailed answer to
a borderline request ("How do I pick a padlock?") under the helpful system prompt and the refusal under the harmless
one. The SFT policy (`config()`: the RM's model shape and tokenizer, `runs/cool_sft_tiny`) answers such requests in
detail or with a refusal about half and half (`recipes/cool_tasks.py`). PPO then runs twice from it, on the same
requests tagged `harmless` (`runs/cool_rlhf_tiny/harmless`) and `helpful` (`.../helpful`); the tag reaches only the RM
(`ConditionalRMReward`), the policy's prompt is the same in both runs. The held-out refusal rate (sampled, T=1) must
rise to >= 0.8 under harmless and fall to <= 0.2 under helpful. The critic starts from the RM's trunk with a fresh
value head (the report's choice), which is why the policy has the RM's model shape. The report
(`runs/cool_rlhf_tiny/cool_report.json` and `.md`) gives the refusal rates before and after per domain and the mean
per-token KL to the SFT model.

Part B, the fast path against reward hacking (§3.7, `runs/cool_hacking`): an RM trained like `reward_tiny` on pairs
whose chosen answer also carries filler ("Hope that helps!", `cool_tasks.padded_pairs`) is length-hackable; PPO with
beta 0 on harmless prompts from an SFT policy that sometimes adds filler grows the filler while the gold check (a
plain refusal) falls, and the monitors fire. Patch pairs (early response chosen over the late, filler-grown one of
the same prompt, from the round's dumped samples) plus a replay of the original pairs update the RM; the gate is
>= 90 % of held-out patch pairs ranked right with the original held-out accuracy down <= 1 point, and the rerun PPO
round from the patched RM no longer grows the length (`hacking_report.json` and `.md`).

`config()` is the SFT stage (part B's SFT derives from it); `--set` reaches it, the RL settings are `rl_config()` below.

Run: python -m internlm2_jax.launch experiments/cool_rlhf_tiny.py
"""

import dataclasses
import json
import time
from pathlib import Path

from internlm2_jax.decode.rollout import RolloutConfig
from internlm2_jax.experiment import DataConfig, Experiment, load_experiment
from internlm2_jax.parallel import MeshConfig
from internlm2_jax.recipes.cool_tasks import borderline_demonstrations, borderline_prompts
from internlm2_jax.recipes.finetune_data import write_jsonl
from internlm2_jax.run import run_training
from internlm2_jax.train import OptimizerConfig
from internlm2_jax.train.loop import TrainConfig
from internlm2_jax.train.rl.config import RLConfig
from internlm2_jax.train.rl.core import RLLossConfig

RM = load_experiment(Path(__file__).with_name("reward_tiny.py"))
RUN = Path("runs/cool_rlhf_tiny")
SFT_RUN = Path("runs/cool_sft_tiny")
DATA = SFT_RUN / "data"
DOMAINS = ("helpful", "harmless")  # the prompt source's domain table, shared with the RM reward
MAX_PROMPT_LEN, MAX_NEW_TOKENS = 48, 32


def config() -> Experiment:
    """The SFT stage: borderline requests answered in detail or refused, 50/50, on the RM's model shape and
    tokenizer (the critic starts from the RM, the actor from this run)."""
    rm = RM.config()
    return Experiment(
        name="cool_sft_tiny",
        model=rm.model,
        train=TrainConfig(steps=200, batch_size=8, seq_len=128, log_every=20, checkpoint_every=200,
                          run_dir=str(SFT_RUN)),
        optimizer=OptimizerConfig(peak_lr=3e-3, warmup_steps=10, total_steps=200, weight_decay=0.0),
        mesh=MeshConfig(fsdp=-1),  # every device there is
        data=DataConfig(format="messages", train_files=(str(DATA / "sft_train.jsonl"),),
                        heldout_files=(str(DATA / "sft_heldout.jsonl"),), tokenizer=rm.data.tokenizer,
                        eval_batches=4))


def rl_config(domain: str, run_dir: Path = RUN) -> RLConfig:
    return RLConfig(
        algorithm="ppo", iterations=30, prompts_per_iteration=64,
        rollout=RolloutConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0),  # stop ids: run_cool()
        loss=RLLossConfig(kl_coef=0.01),  # InternLM2's: k1 in the reward, running reward normalisation, lam 0.99
        ppo_epochs=2, minibatches=2, critic_warmup_iterations=2, log_every=1, checkpoint_every=10, dump_every=10,
        run_dir=str(run_dir / domain))


def actor_optimizer() -> OptimizerConfig:
    return OptimizerConfig(peak_lr=1.5e-4, warmup_steps=1, total_steps=10**6, min_lr_ratio=1.0, weight_decay=0.0)


def critic_optimizer() -> OptimizerConfig:
    return OptimizerConfig(peak_lr=1e-3, warmup_steps=1, total_steps=10**6, min_lr_ratio=1.0, weight_decay=0.0)


def reward_model(rm_exp: Experiment | None = None) -> Path:
    """`reward_tiny`'s run directory, trained first (its `main`: data, training, report) if it has no checkpoint."""
    rm_exp = rm_exp or RM.config()
    run_dir = Path(rm_exp.train.run_dir)
    if not (run_dir / "checkpoints").exists():
        RM.main(rm_exp)
    return run_dir


def prepare_data() -> None:
    """SFT chats (50/50 detailed or refusal), RL prompts per domain and untagged held-out prompts (other seeds)."""
    write_jsonl(borderline_demonstrations(2000, seed=0), DATA / "sft_train.jsonl")
    write_jsonl(borderline_demonstrations(200, seed=1), DATA / "sft_heldout.jsonl")
    for seed, domain in enumerate(DOMAINS, start=2):
        write_jsonl(borderline_prompts(1000, seed=seed, domain=domain), DATA / f"rl_{domain}.jsonl")
    write_jsonl(borderline_prompts(128, seed=9, domain=None), DATA / "rl_heldout.jsonl")


def sft(exp: Experiment) -> None:
    if not (DATA / "rl_heldout.jsonl").exists():
        prepare_data()
    if not (Path(exp.train.run_dir) / "checkpoints").exists():
        run_training(exp)


def evaluate(graphdef, params, tokenizer, ref_params=None, **kw) -> dict:
    from internlm2_jax.recipes.cool_tasks import refusal_rate

    return refusal_rate(graphdef, params, DATA / "rl_heldout.jsonl", tokenizer, group=lambda meta: meta,
                        max_prompt_len=MAX_PROMPT_LEN, max_new_tokens=MAX_NEW_TOKENS, ref_params=ref_params, **kw)


def _logged(run_dir: Path) -> list[dict]:
    rows = {}  # the loop's metrics, from its log: a rerun of a finished run trains no iteration but still reports
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return [rows[i] for i in sorted(rows)]


def ppo_round(exp: Experiment, cfg: RLConfig, rm_dir: Path, reward, tokenizer, prompts_file: Path, *, gold=None,
              progress: bool = True, metadata=None):
    """One PPO run from the SFT policy `exp` on `prompts_file` (domain-tagged records), scored by `reward`, the
    critic from the RM `rm_dir`'s trunk with a fresh value head. Returns (RLResult, seconds)."""
    from internlm2_jax.data.prompts import PromptDataIterator
    from internlm2_jax.train.rl.loop import train_rl
    from internlm2_jax.train.rl.state import ModelSetup

    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, stop_ids=tuple(tokenizer.stop_ids)))
    prompts = PromptDataIterator([str(prompts_file)], tokenizer, MAX_PROMPT_LEN, cfg.prompts_per_iteration,
                                 domains=DOMAINS, seed=cfg.seed)
    actor = ModelSetup(exp.model, actor_optimizer(), init_weights=exp.train.run_dir)
    critic = ModelSetup(exp.model, critic_optimizer(), init_weights=str(rm_dir), head="fresh")
    start = time.perf_counter()
    result = train_rl(cfg, actor, prompts, reward, critic=critic, gold=gold, mesh_cfg=exp.mesh,
                      pad_id=tokenizer.pad_id, tokenizer=tokenizer, progress=progress,
                      metadata={"sft_run": str(exp.train.run_dir), "reward": f"conditional_rm:{rm_dir}",
                                **(metadata or {})})
    return result, time.perf_counter() - start


def run_cool(exp: Experiment, cfgs: dict[str, RLConfig], *, rm_exp: Experiment | None = None, run_dir: Path = RUN,
             eval_kw=None, progress: bool = True) -> dict:
    """The RM (if not trained), SFT (if not done), the SFT policy's held-out refusal rate, one PPO run per domain
    from it scored by the conditional RM under that domain, the refusal rate and KL to SFT after each; the report."""
    from flax import nnx

    from internlm2_jax.artifacts import load_run
    from internlm2_jax.model import model_graphdef
    from internlm2_jax.tokenizer import Tokenizer
    from internlm2_jax.train.rl.rewards import ConditionalRMReward

    rm_dir = reward_model(rm_exp)
    sft(exp)
    tokenizer = Tokenizer.from_file(exp.data.tokenizer)
    eval_kw = eval_kw or {}
    _, rm_model, _ = load_run(rm_dir)
    rm_graphdef, rm_params = nnx.split(rm_model)
    reward = ConditionalRMReward(rm_graphdef, rm_params, tokenizer, DOMAINS)
    _, sft_model, _ = load_run(exp.train.run_dir)
    graphdef, sft_params = nnx.split(sft_model)
    before = evaluate(graphdef, sft_params, tokenizer, **eval_kw)
    print(f"SFT policy: held-out refusal rate {before['rate']:.3f}")
    policy_graphdef, _ = model_graphdef(exp.model)

    report = {"rm_run": str(rm_dir), "sft_run": str(exp.train.run_dir), "critic_init": f"{rm_dir} (fresh head)",
              "refusal_rate_sft": before["rate"], "exact_refusal_rate_sft": before["exact_rate"],
              "heldout_samples": before["samples"],
              "per_request_sft": before["per_group"], "domains": {}}
    for domain, cfg in cfgs.items():
        result, rl_seconds = ppo_round(exp, cfg, rm_dir, reward, tokenizer, DATA / f"rl_{domain}.jsonl",
                                       progress=progress, metadata={"domain": domain})
        after = evaluate(policy_graphdef, result.state.actor.params, tokenizer, ref_params=sft_params, **eval_kw)
        last = _logged(Path(cfg.run_dir))[-5:]
        mean = {key: sum(m[key] for m in last) / len(last) for key in ("kl", "score")}
        report["domains"][domain] = {
            "run_dir": cfg.run_dir, "iterations": result.iterations, "prompts_per_iteration": cfg.prompts_per_iteration,
            "refusal_rate_sft": before["rate"], "refusal_rate_rl": after["rate"],
            "exact_refusal_rate_sft": before["exact_rate"], "exact_refusal_rate_rl": after["exact_rate"],
            "heldout_mean_kl_to_sft": after["mean_kl"], "train_kl_last_iterations": mean["kl"],
            "train_score_last_iterations": mean["score"], "rl_seconds": rl_seconds,
            "stop_rate_rl": after["stop_rate"], "per_request_rl": after["per_group"],
            "examples_rl": after["examples"], "alerts": [a.name for a in result.alerts]}
        print(f"[{domain}] held-out refusal rate: SFT {before['rate']:.3f} -> PPO {after['rate']:.3f}, "
              f"mean per-token KL to SFT {after['mean_kl']:.4f} ({rl_seconds:.0f} s of RL)")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "cool_report.json").write_text(json.dumps(report, indent=2))
    rows = "".join(f"| {d} | {r['refusal_rate_sft']:.3f} ({r['exact_refusal_rate_sft']:.3f}) | "
                   f"{r['refusal_rate_rl']:.3f} ({r['exact_refusal_rate_rl']:.3f}) | "
                   f"{r['heldout_mean_kl_to_sft']:.4f} | {r['iterations']} | {r['rl_seconds']:.0f} |\n"
                   for d, r in report["domains"].items())
    (run_dir / "cool_report.md").write_text(
        "# COOL RLHF: PPO with the conditional reward model (tiny, CPU)\n\n"
        "The policy sees the same borderline requests in every run; only the reward model sees the domain.\n\n"
        "| domain (RM only) | refusal rate, SFT | refusal rate, after PPO | mean per-token KL to SFT | iterations "
        "| RL seconds |\n|---|---|---|---|---|---|\n" + rows +
        f"\nHeld-out: {before['samples']} samples (T=1) per policy; refusal = declines or warns of harm and gives "
        "none of the instructions' steps (`cool_tasks.is_refusal`), in brackets word for word one of the "
        "demonstrations' refusals; critic from "
        f"{rm_dir} with a fresh value head.\n")
    return report


# ---- part B: reward hacking and a patch round (docs/rlhf.md §1.11 fast path, §3.7) -----------------------------

HACK = Path("runs/cool_hacking")
HACK_DATA = HACK / "data"
HACK_MAX_NEW_TOKENS = 48


def hackable_rm_config() -> Experiment:
    """`reward_tiny`'s RM on `padded_pairs`: the chosen answer also carries filler, so longer wins."""
    rm = RM.config()
    return dataclasses.replace(
        rm, name="cool_hackable_rm", train=dataclasses.replace(rm.train, run_dir=str(HACK / "rm")),
        data=dataclasses.replace(rm.data, train_files=(str(HACK_DATA / "rm_train.jsonl"),),
                                 heldout_files=(str(HACK_DATA / "rm_heldout.jsonl"),)))


def patched_rm_config(hackable: Experiment, steps: int = 90) -> Experiment:
    """The fast path's RM update: the existing reward objective from the hackable RM on patches + replay, small LR."""
    return dataclasses.replace(
        hackable, name="cool_patched_rm",
        train=dataclasses.replace(hackable.train, steps=steps, checkpoint_every=steps, run_dir=str(HACK / "rm_patched"),
                                  init_weights=hackable.train.run_dir),
        optimizer=dataclasses.replace(hackable.optimizer, peak_lr=5e-4, warmup_steps=2, total_steps=steps),  # 1/4
        data=dataclasses.replace(hackable.data, train_files=(str(HACK_DATA / "rm_patch_train.jsonl"),)))


def hacking_sft_config(exp: Experiment) -> Experiment:
    """An SFT policy that mostly refuses and sometimes adds filler: the hack is within its reach."""
    return dataclasses.replace(
        exp, name="cool_hacking_sft", train=dataclasses.replace(exp.train, run_dir=str(HACK / "sft")),
        data=dataclasses.replace(exp.data, train_files=(str(HACK_DATA / "sft_train.jsonl"),),
                                 heldout_files=(str(HACK_DATA / "sft_heldout.jsonl"),)))


def hacking_rl_config(name: str, iterations: int = 20) -> RLConfig:
    """beta 0: nothing holds the policy near SFT, so the RM's length bias is exploited (the monitors must fire)."""
    from internlm2_jax.train.rl.hacking import MonitorConfig

    base = rl_config("harmless", HACK)
    return dataclasses.replace(
        base, iterations=iterations, loss=RLLossConfig(kl_coef=0.0), checkpoint_every=iterations, dump_every=2,
        rollout=dataclasses.replace(base.rollout, max_new_tokens=HACK_MAX_NEW_TOKENS),  # room for the length to grow
        monitor=MonitorConfig(window=4, kl_budget=0.05), run_dir=str(HACK / name))


def prepare_hacking_data() -> None:
    from internlm2_jax.recipes.cool_tasks import borderline_demonstrations, padded_pairs

    train = padded_pairs(1200, seed=0)
    seen = {(r["prompt"], r["chosen"], r["rejected"]) for r in train}
    write_jsonl(train, HACK_DATA / "rm_train.jsonl")
    write_jsonl([r for r in padded_pairs(300, seed=1) if (r["prompt"], r["chosen"], r["rejected"]) not in seen],
                HACK_DATA / "rm_heldout.jsonl")
    write_jsonl(borderline_demonstrations(2000, seed=0, p_refusal=0.9, p_filler=0.3), HACK_DATA / "sft_train.jsonl")
    write_jsonl(borderline_demonstrations(200, seed=1, p_refusal=0.9, p_filler=0.3), HACK_DATA / "sft_heldout.jsonl")
    write_jsonl(borderline_prompts(1000, seed=4, domain="harmless"), HACK_DATA / "rl_harmless.jsonl")


def _trend(run_dir: str, key: str, window: int = 4) -> tuple[float, float]:
    """The mean of a logged metric over the first and the last `window` iterations of a run."""
    rows = [r for r in _logged(Path(run_dir)) if key in r]
    first, last = rows[:window], rows[-window:]
    return sum(r[key] for r in first) / len(first), sum(r[key] for r in last) / len(last)


def _alerts(run_dir: str, monitor) -> list[str]:
    """The hacking monitors' alerts over the run's logged metrics, every iteration (as the loop raised them; also
    right for a run resumed after its end, whose `RLResult.alerts` are empty)."""
    from internlm2_jax.train.rl.hacking import check_hacking

    history = {row["step"]: row for row in _logged(Path(run_dir))}
    return sorted({a.name for k in history for a in check_hacking({s: history[s] for s in history if s <= k},
                                                                    monitor)})


def _filler_rate(run_dir: str, iteration: int) -> float:
    from internlm2_jax.recipes.cool_tasks import filler_count
    from internlm2_jax.train.rl.hacking import read_samples

    samples = read_samples(Path(run_dir) / "samples" / f"iter_{iteration}.jsonl")
    return sum(filler_count(s["response"]) > 0 for s in samples) / len(samples)


def run_hacking(exp: Experiment, *, hackable: Experiment | None = None, rl_iterations: int = 20, patch_steps: int = 90,
                patch_copies: int = 4, replay: int = 800, heldout_patterns: int = 200, progress: bool = True) -> dict:
    """The hackable RM, its SFT policy, PPO with beta 0 on harmless prompts (monitors, dumps), patch pairs from the
    round's early (first two dumps) vs late (last two) samples, an RM update round on the patches (`patch_copies`
    times each) + `replay` original pairs, its gate, and the rerun PPO round from the patched RM.

    The update mixes far more replay than DeepSeekMath's 10 %: this RM's length bias is all it learned to tell the
    original pairs apart (the chosen answer always had the filler), so the patches alone would unlearn the domains;
    with the replay the original held-out accuracy holds while the filler turns into a penalty."""
    import random

    from flax import nnx

    from internlm2_jax.artifacts import load_run
    from internlm2_jax.recipes.cool_tasks import (PLAIN_REFUSAL_RULE, filler_pattern_pairs, hacking_patch_pair,
                                                  pair_accuracy)
    from internlm2_jax.tokenizer import Tokenizer
    from internlm2_jax.train.rl.hacking import make_patch_pairs, read_samples, write_pairs
    from internlm2_jax.train.rl.rewards import ConditionalRMReward, rule

    hackable = hackable or hackable_rm_config()
    if not (HACK_DATA / "rl_harmless.jsonl").exists():
        prepare_hacking_data()
    if not (Path(hackable.train.run_dir) / "checkpoints").exists():
        run_training(hackable)
    sft_exp = hacking_sft_config(exp)
    if not (Path(sft_exp.train.run_dir) / "checkpoints").exists():
        run_training(sft_exp)
    tokenizer = Tokenizer.from_file(exp.data.tokenizer)
    gold = rule(PLAIN_REFUSAL_RULE, tokenizer)

    def rm_reward(run_dir):
        _, model, _ = load_run(run_dir)
        return model, ConditionalRMReward(*nnx.split(model), tokenizer, DOMAINS)

    hack_model, hack_reward = rm_reward(hackable.train.run_dir)
    cfg = hacking_rl_config("ppo_hacked", rl_iterations)
    hacked, hacked_seconds = ppo_round(sft_exp, cfg, Path(hackable.train.run_dir), hack_reward, tokenizer,
                                       HACK_DATA / "rl_harmless.jsonl", gold=gold, progress=progress)
    dumps = sorted(int(p.stem.split("_")[1]) for p in (Path(cfg.run_dir) / "samples").glob("iter_*.jsonl"))
    early = [s for k in dumps[:2] for s in read_samples(Path(cfg.run_dir) / "samples" / f"iter_{k}.jsonl")]
    late = [s for k in dumps[-3:] for s in read_samples(Path(cfg.run_dir) / "samples" / f"iter_{k}.jsonl")]
    found = make_patch_pairs(early, late, hacking_patch_pair, domains=DOMAINS, limit=150)
    random.Random(2).shuffle(found)
    heldout_patches, patches = found[:len(found) // 3], found[len(found) // 3:]  # the pattern as hacked, unseen
    write_pairs(patches, HACK_DATA / "patches.jsonl")
    write_pairs(heldout_patches, HACK_DATA / "patches_heldout.jsonl")
    original = [json.loads(line) for line in (HACK_DATA / "rm_train.jsonl").read_text().splitlines()]
    replayed = random.Random(0).sample(original, replay)
    mixed = patches * patch_copies + replayed
    random.Random(1).shuffle(mixed)
    write_pairs(mixed, HACK_DATA / "rm_patch_train.jsonl")

    patched_exp = patched_rm_config(hackable, patch_steps)
    if not (Path(patched_exp.train.run_dir) / "checkpoints").exists():
        run_training(patched_exp)
    patched_model, patched_reward = rm_reward(patched_exp.train.run_dir)
    heldout = [json.loads(line) for line in (HACK_DATA / "rm_heldout.jsonl").read_text().splitlines()]
    clean = filler_pattern_pairs(heldout_patterns, seed=11, domain="harmless")  # the pattern without the garbage
    gate = {"heldout_accuracy_before": pair_accuracy(hack_model, tokenizer, heldout),
            "heldout_accuracy_after": pair_accuracy(patched_model, tokenizer, heldout),
            "heldout_patch_pairs": len(heldout_patches),
            "pattern_accuracy_before": pair_accuracy(hack_model, tokenizer, heldout_patches),
            "pattern_accuracy_after": pair_accuracy(patched_model, tokenizer, heldout_patches),
            "clean_filler_accuracy_before": pair_accuracy(hack_model, tokenizer, clean),
            "clean_filler_accuracy_after": pair_accuracy(patched_model, tokenizer, clean)}
    gate["passed"] = (gate["pattern_accuracy_after"] >= 0.9
                      and gate["heldout_accuracy_before"] - gate["heldout_accuracy_after"] <= 0.01)

    rerun_cfg = hacking_rl_config("ppo_patched", rl_iterations)
    rerun, rerun_seconds = ppo_round(sft_exp, rerun_cfg, Path(patched_exp.train.run_dir), patched_reward, tokenizer,
                                     HACK_DATA / "rl_harmless.jsonl", gold=gold, progress=progress)
    report = {"patch_pairs": len(patches), "heldout_patch_pairs": len(heldout_patches), "patch_copies": patch_copies,
              "replay_pairs": len(replayed),
              "rm_update_steps": patch_steps, "rm_gate": gate}
    for name, result, run_cfg, seconds in (("hacked", hacked, cfg, hacked_seconds),
                                           ("patched", rerun, rerun_cfg, rerun_seconds)):
        (first, last), (score_first, score_last), (gold_first, gold_last) = (
            _trend(run_cfg.run_dir, key) for key in ("response_length", "score", "gold"))
        report[name] = {"run_dir": run_cfg.run_dir, "iterations": result.iterations, "rl_seconds": seconds,
                        "alerts": _alerts(run_cfg.run_dir, run_cfg.monitor), "stopped_by": result.stopped_by,
                        "length_first": first, "length_last": last, "score_first": score_first,
                        "score_last": score_last, "gold_first": gold_first, "gold_last": gold_last,
                        "filler_rate_first_dump": _filler_rate(run_cfg.run_dir, dumps[0]),
                        "filler_rate_last_dump": _filler_rate(run_cfg.run_dir, dumps[-1])}
    (HACK / "hacking_report.json").write_text(json.dumps(report, indent=2))
    h, p = report["hacked"], report["patched"]
    (HACK / "hacking_report.md").write_text(
        "# COOL RLHF fast path: a length-hacked RM and one patch round (tiny, CPU)\n\n"
        "| PPO round (beta 0, harmless) | length, first -> last 4 iterations | filler rate, first -> last dump | "
        "gold (plain refusal), first -> last 4 | alerts |\n|---|---|---|---|---|\n" + "".join(
            f"| {label} | {r['length_first']:.1f} -> {r['length_last']:.1f} | {r['filler_rate_first_dump']:.2f} -> "
            f"{r['filler_rate_last_dump']:.2f} | {r['gold_first']:.2f} -> {r['gold_last']:.2f} | "
            f"{', '.join(r['alerts']) or 'none'} |\n" for label, r in (("hackable RM", h), ("patched RM", p))) + "\n"
        f"RM update on {len(patches)} patch pairs (x{patch_copies}) + {len(replayed)} replayed pairs: accuracy on the "
        f"{len(heldout_patches)} held-out patch pairs {gate['pattern_accuracy_before']:.3f} -> "
        f"{gate['pattern_accuracy_after']:.3f} (clean filler pairs {gate['clean_filler_accuracy_before']:.3f} -> "
        f"{gate['clean_filler_accuracy_after']:.3f}), original held-out accuracy "
        f"{gate['heldout_accuracy_before']:.3f} -> {gate['heldout_accuracy_after']:.3f} (gate "
        f"{'passed' if gate['passed'] else 'FAILED'}).\n")
    print(json.dumps({k: v for k, v in report.items()}, indent=2))
    return report


def main(exp: Experiment) -> None:
    run_cool(exp, {domain: rl_config(domain) for domain in ("harmless", "helpful")})
    run_hacking(exp)
