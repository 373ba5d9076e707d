"""Reward sources for online RL (docs/rlhf.md §2.11): what turns a rollout into one score per row.

A reward source is a callable `reward(batch: PromptBatch, rollout: Rollout) -> np.ndarray` float32 [rows], rows
prompt-major as the rollout's (row b * G + g is sample g of prompt b, G = rows // batch.size). Three kinds:

- `ConditionalRMReward`: COOL RLHF's conditional reward model, scored on **spliced ids** (§2.4 step 4, `rm_rows`):
  the domain's system turn is put in front of the policy prompt's ids and the response ids are appended as sampled,
  so the RM sees exactly what the policy emitted, without a decode/re-encode round trip. The pieces of the splice are
  cut out of what `chat_prompts.reward_sequence` renders (`domain_prefix_ids`, `response_suffix_ids`), so for a
  canonical generation (the response ids are the tokenisation of their text) the splice *is* `reward_sequence` of the
  decoded conversation (tested).
- `RuleReward`: a Python function of (metas, decoded texts, stopped), e.g. the registered `rule("exact", tok)` and
  `rule("doctest", tok)` (the response's code run against the prompt's doctest in `internlm2_jax/sandbox`). Rule
  rewards are how GRPO is normally run and how the tiny tasks are checked.
- `mixed_reward`: per-domain dispatch, `{"code": rule("doctest", tok), "*": rm}`.

Everything here runs on the host except the RM forward (one jitted call per `batch_size` rows, on the RM parameters'
mesh). Scores of every source go through the same clip/normalise path afterwards (`train/rl/core.py`).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from flax import nnx

from internlm2_jax.chat_prompts import DOMAIN_PROMPTS, reward_sequence
from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.data.prompts import PromptBatch
from internlm2_jax.decode.reward import score_rows
from internlm2_jax.decode.rollout import Rollout
from internlm2_jax.decode.scoring import padded_rows
from internlm2_jax.sandbox import run_program
from internlm2_jax.model import InternLM2ForRewardModel
from internlm2_jax.parallel.mesh import global_rows, local_rows, mesh_of, process_row_degree, within_mesh_of

RewardSource = Callable[[PromptBatch, Rollout], np.ndarray]
RuleFn = Callable[[Sequence[Any], Sequence[str], np.ndarray], np.ndarray]  # (metas, texts, stopped) -> [rows]
RM_FIELDS = ("input_ids", "positions", "segment_ids", "lengths")
DEFAULT_TEMPLATE = "internlm2_chat"


# ---- rows and responses -------------------------------------------------------------------------------------------


def group_size(batch: PromptBatch, rollout: Rollout) -> int:
    """G, the samples per prompt: the rollout's rows are whole prompt-major groups of the batch's prompts."""
    rows = np.shape(rollout.tokens)[0]
    if batch.size == 0 or rows % batch.size:
        raise ValueError(f"the rollout has {rows} rows, not a multiple of the batch's {batch.size} prompts "
                         "(rows are prompt-major groups of samples)")
    return rows // batch.size


def response_ids(rollout: Rollout) -> list[np.ndarray]:
    """Each row's response as sampled: its `lengths` tokens, without the stop id when the row stopped (the template,
    not the sample, closes the turn)."""
    tokens, lengths, stopped = (np.asarray(x) for x in (rollout.tokens, rollout.lengths, rollout.stopped))
    return [tokens[row, :int(n) - int(bool(stop))] for row, (n, stop) in enumerate(zip(lengths, stopped, strict=True))]


def take_prompts(batch: PromptBatch, rollout: Rollout, prompts: Sequence[int]) -> tuple[PromptBatch, Rollout]:
    """The sub-batch of `prompts` (indices) with all their samples, still prompt-major."""
    group = group_size(batch, rollout)
    prompts = np.asarray(prompts, np.int64)
    rows = (prompts[:, None] * group + np.arange(group)).ravel()
    sub_batch = PromptBatch(np.asarray(batch.prompt_ids)[prompts], np.asarray(batch.prompt_lengths)[prompts],
                            np.asarray(batch.domain_ids)[prompts], tuple(batch.metas[i] for i in prompts),
                            None if batch.records is None else tuple(batch.records[i] for i in prompts))
    sub_rollout = Rollout(*(np.asarray(getattr(rollout, f.name))[rows] for f in dataclasses.fields(Rollout)))
    return sub_batch, sub_rollout


# ---- the conditional RM's rows: the splice --------------------------------------------------------------------------


def domain_prefix_ids(tokenizer, domains: Sequence[str], domain_prompts: Mapping[str, str] = DOMAIN_PROMPTS,
                      template: str = DEFAULT_TEMPLATE) -> dict[int, list[int]]:
    """Domain id (index into `domains`) -> the ids of that domain's system turn, as `reward_sequence` renders it
    between the BOS and the conversation.

    Cut out of `reward_sequence` itself (with and without the domain, on an empty conversation) rather than rebuilt
    from strings, so the splice follows the renderer if it changes; the template encodes each message on its own, so
    the turn's ids do not depend on what follows it."""
    bare = reward_sequence([], None, tokenizer, domain_prompts, template)  # [BOS, reward token]
    head, tail = bare[:-1], bare[-1:]
    prefixes = {}
    for index, name in enumerate(domains):
        ids = reward_sequence([], name, tokenizer, domain_prompts, template)  # unknown names raise, naming the known
        if ids[:len(head)] != head or ids[-len(tail):] != tail:
            raise ValueError(f"template {template!r} does not render domain {name!r}'s system turn between the BOS "
                             f"and the conversation ({ids} vs {bare}): the RM rows cannot be spliced")
        prefixes[index] = ids[len(head):-len(tail)]
    return prefixes


def _open_and_closed(tokenizer, template: str) -> tuple[list[int], list[int]]:
    """(the generation prompt alone, an empty assistant turn as `reward_sequence` renders it)."""
    opened, _ = get_chat_template(template).encode([], tokenizer, add_generation_prompt=True)
    closed = reward_sequence([{"role": "assistant", "content": ""}], None, tokenizer, template=template)
    if closed[:len(opened)] != opened or closed[-1] != tokenizer.reward_token_id:
        raise ValueError(f"template {template!r}: an assistant turn does not start with the generation prompt "
                         f"({closed} vs {opened}): responses cannot be spliced after the policy prompt")
    return opened, closed


def generation_prompt_ids(tokenizer, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """The ids every policy prompt ends with (`<|im_start|>assistant\\n`): the response is spliced right after them."""
    opened, _ = _open_and_closed(tokenizer, template)
    bos = get_chat_template(template).encode([], tokenizer)[0]
    return opened[len(bos):]


def response_suffix_ids(tokenizer, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """The ids that close an assistant turn after its content (`<|im_end|>`, `\\n`), up to the reward token: what
    `reward_sequence` renders after the response, cut out of it."""
    opened, closed = _open_and_closed(tokenizer, template)
    return closed[len(opened):-1]


def rm_rows(batch: PromptBatch, rollout: Rollout, domain_prefixes: Mapping[int, Sequence[int]], *,
            reward_token_id: int, im_end_ids: Sequence[int], pad_id: int, length: int | None = None) -> dict:
    """The reward model's rows (§2.4 step 4): per row, `prompt_ids[0]` (BOS) ⊕ its domain's system turn ⊕
    `prompt_ids[1:prompt_len]` (ending with the generation prompt) ⊕ the response (stop id dropped) ⊕ `im_end_ids`
    ⊕ [reward_token_id], right-padded with `pad_id` to `length` (default: the widest possible row, so one shape per
    batch and rollout width).

    `domain_prefixes` maps domain id -> system-turn ids (`domain_prefix_ids`); an optional key -1 is the default
    domain's, for prompts without one. Returns numpy [rows, length] `input_ids`, `positions`, `segment_ids` (1 real,
    0 pad) and `lengths` [rows]."""
    prompts, prompt_lengths = np.asarray(batch.prompt_ids), np.asarray(batch.prompt_lengths)
    domain_ids = np.asarray(batch.domain_ids)
    group = group_size(batch, rollout)
    missing = sorted({int(d) for d in domain_ids} - set(domain_prefixes))
    if missing:
        where = {d: np.flatnonzero(domain_ids == d).tolist() for d in missing}
        if -1 in where:
            raise ValueError(f"prompts {where[-1]} have no domain (domain id -1): the conditional reward model judges "
                             "a response under a domain's system turn; tag the prompts with a domain or give a "
                             "default domain")
        raise ValueError(f"domain ids {missing} (prompts {where}) have no system turn; known ids: "
                         f"{sorted(domain_prefixes)}")
    closing = [*im_end_ids, reward_token_id]
    responses = response_ids(rollout)
    sequences = []
    for row, response in enumerate(responses):
        b = row // group
        prompt = prompts[b, :int(prompt_lengths[b])]
        sequences.append(np.concatenate([prompt[:1], domain_prefixes[int(domain_ids[b])], prompt[1:], response,
                                         closing]).astype(np.int32))
    if length is None:
        widest_prefix = max((len(p) for p in domain_prefixes.values()), default=0)
        length = prompts.shape[1] + widest_prefix + np.shape(rollout.tokens)[1] + len(closing)
    needed = np.asarray([len(s) for s in sequences], np.int32)
    too_long = np.flatnonzero(needed > length)
    if too_long.size:
        raise ValueError(f"length={length}: RM rows {too_long.tolist()} need {needed[too_long].tolist()} tokens "
                         "(BOS + domain turn + prompt + response + closing ids + reward token)")
    rows = len(sequences)
    out = {"input_ids": np.full((rows, length), pad_id, np.int32), "positions": np.zeros((rows, length), np.int32),
           "segment_ids": np.zeros((rows, length), np.int32), "lengths": needed}
    for row, sequence in enumerate(sequences):
        out["input_ids"][row, :len(sequence)] = sequence
        out["positions"][row, :len(sequence)] = np.arange(len(sequence))
        out["segment_ids"][row, :len(sequence)] = 1
    return out


class ConditionalRMReward:
    """The conditional RM's score of each row under its prompt's domain (§2.4 step 4, §2.11 `rm`).

    `graphdef, params`: an `InternLM2ForRewardModel` split (`nnx.split`), params possibly on a mesh (the forward runs
    under it, rows padded to its data-parallel degree). `domains`: the prompt source's domain table (what
    `PromptBatch.domain_ids` index). `default_domain` (a name in `domain_prompts`) judges prompts without a domain;
    without it they are refused, since the conditional RM has no neutral judgement. `batch_size` rows go through one
    forward (None: all rows at once); a fixed `batch_size` also keeps one compiled shape when the row count varies
    (under `mixed_reward`). Rows longer than `max_len` (default the RM's `max_position_embeddings`) are refused.
    """

    def __init__(self, graphdef, params, tokenizer, domains: Sequence[str], *,
                 domain_prompts: Mapping[str, str] = DOMAIN_PROMPTS, default_domain: str | None = None,
                 template: str = DEFAULT_TEMPLATE, batch_size: int | None = None, max_len: int | None = None):
        model = nnx.merge(graphdef, params)
        if not isinstance(model, InternLM2ForRewardModel):
            raise TypeError(f"ConditionalRMReward needs an InternLM2ForRewardModel, got {type(model).__name__}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be >= 1 (or None: all rows in one forward)")
        self.graphdef, self.params = graphdef, params
        self.domains = tuple(domains)
        self.prefixes = domain_prefix_ids(tokenizer, self.domains, domain_prompts, template)
        if default_domain is not None:
            self.prefixes[-1] = domain_prefix_ids(tokenizer, (default_domain,), domain_prompts, template)[0]
        self.im_end_ids = response_suffix_ids(tokenizer, template)
        self.generation_prompt = generation_prompt_ids(tokenizer, template)
        self.bos_id, self.pad_id, self.reward_token_id = tokenizer.bos_id, tokenizer.pad_id, tokenizer.reward_token_id
        self.batch_size = batch_size
        self.max_len = max_len or model.cfg.max_position_embeddings

    def rows(self, batch: PromptBatch, rollout: Rollout) -> dict:
        """The spliced rows (`rm_rows`), after checking the prompts are what the splice assumes."""
        self._check_prompts(batch)
        widest = max(len(p) for p in self.prefixes.values())
        width = np.shape(batch.prompt_ids)[1] + widest + np.shape(rollout.tokens)[1] + len(self.im_end_ids) + 1
        return rm_rows(batch, rollout, self.prefixes, reward_token_id=self.reward_token_id,
                       im_end_ids=self.im_end_ids, pad_id=self.pad_id, length=min(width, self.max_len))

    def __call__(self, batch: PromptBatch, rollout: Rollout) -> np.ndarray:
        rows = self.rows(batch, rollout)
        tokens, lengths = rows["input_ids"], rows["lengths"]
        n = len(lengths)
        mesh = mesh_of(self.params)
        if mesh is None or jax.process_count() == 1:
            per_call = padded_rows(self.params, self.batch_size or max(n, 1))
        else:  # several processes: each scores its own rows, as one global batch per call
            degree = process_row_degree(mesh)
            per_call = -(-(self.batch_size or max(n, 1)) // degree) * degree
        out = np.zeros(n, np.float32)
        for start in range(0, n, per_call):
            chunk_tokens = np.full((per_call, tokens.shape[1]), self.pad_id, np.int32)
            chunk_lengths = np.zeros(per_call, np.int32)  # padding rows (length 0) are scored and dropped
            stop = min(start + per_call, n)
            chunk_tokens[:stop - start], chunk_lengths[:stop - start] = tokens[start:stop], lengths[start:stop]
            if mesh is not None:
                chunk_tokens, chunk_lengths = global_rows(mesh, chunk_tokens), global_rows(mesh, chunk_lengths)
            with within_mesh_of(self.params):
                scores = score_rows(self.graphdef, self.params, chunk_tokens, chunk_lengths)
            out[start:stop] = local_rows(scores)[:stop - start]
        return out

    def scores_under(self, batch: PromptBatch, rollout: Rollout, domain: int | str) -> np.ndarray:
        """Every row judged under one domain (an index into `domains` or its name), whatever its prompt's: one row of
        COOL's cross-domain matrix (a response tuned for one preference, scored by all of them)."""
        index = self.domains.index(domain) if domain in self.domains else domain
        if not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.domains):
            raise ValueError(f"domain {domain!r} is not one of {self.domains} (or an index into them)")
        return self(dataclasses.replace(batch, domain_ids=np.full(batch.size, index, np.int32)), rollout)

    def _check_prompts(self, batch: PromptBatch) -> None:
        prompts, prompt_lengths = np.asarray(batch.prompt_ids), np.asarray(batch.prompt_lengths)
        tail = np.asarray(self.generation_prompt)
        bad = [b for b in range(batch.size)
               if prompts[b, 0] != self.bos_id or prompt_lengths[b] < 1 + len(tail)
               or not np.array_equal(prompts[b, int(prompt_lengths[b]) - len(tail):int(prompt_lengths[b])], tail)]
        if bad:
            raise ValueError(f"prompts {bad} do not start with BOS ({self.bos_id}) and end with the generation prompt "
                             f"{self.generation_prompt}: the RM rows are spliced from chat-template prompts rendered "
                             "with add_generation_prompt=True")


# ---- rule rewards -------------------------------------------------------------------------------------------------


class RuleReward:
    """`fn(metas, texts, stopped) -> [rows]` as a reward source: each row's response decoded (stop id dropped), with
    its prompt's `meta` (repeated for each of the prompt's samples) and whether it stopped."""

    def __init__(self, fn: RuleFn, tokenizer, name: str | None = None):
        self.fn, self.tokenizer = fn, tokenizer
        self.name = name or getattr(fn, "__name__", "rule")

    def texts(self, rollout: Rollout) -> list[str]:
        return [self.tokenizer.decode(ids) for ids in response_ids(rollout)]

    def __call__(self, batch: PromptBatch, rollout: Rollout) -> np.ndarray:
        group = group_size(batch, rollout)
        rows = np.shape(rollout.tokens)[0]
        metas = [batch.metas[row // group] for row in range(rows)]
        scores = np.asarray(self.fn(metas, self.texts(rollout), np.asarray(rollout.stopped, bool)), np.float32)
        if scores.shape != (rows,):
            raise ValueError(f"rule {self.name!r} returned shape {list(scores.shape)}, expected [{rows}] (one per row)")
        return scores


def exact_match(metas: Sequence[Any], texts: Sequence[str], stopped: np.ndarray) -> np.ndarray:
    """1.0 where the stripped response equals the meta (the expected answer string), else 0.0."""
    for row, meta in enumerate(metas):
        if not isinstance(meta, str):
            raise ValueError(f"rule 'exact': row {row}'s meta is {meta!r}; it must be the expected answer string")
    return np.asarray([text.strip() == meta.strip() for meta, text in zip(metas, texts, strict=True)], np.float32)


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)

# Runs the examples against the names the response defined; a failed example exits 1 (the sandbox's "failed").
_DOCTEST_HARNESS = """

def _rl_reward_doctest(examples, globs):
    import doctest, sys
    test = doctest.DocTestParser().get_doctest(examples, dict(globs), "meta", None, 0)
    if doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test, out=sys.stderr.write).failed:
        raise SystemExit(1)

_rl_reward_doctest({examples!r}, globals())
"""


def doctest_examples(meta: str) -> str:
    """The doctest a response must pass: the docstrings of `meta` when it is Python source (the prompt's stub, whose
    docstring holds the examples; parsed, never run), else `meta` itself (bare `>>>` examples). Taken from the meta,
    never from the response, so a policy cannot pass by editing its own docstring."""
    try:
        tree = ast.parse(meta)
    except SyntaxError:
        return meta
    kinds = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return "\n".join(doc for node in ast.walk(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node)))


def doctest_program(meta: str, text: str) -> str:
    """The script the sandbox runs: the response's code (its first fenced block when it has one, else all of it),
    then the meta's doctest examples run against what it defined."""
    fenced = _FENCE.search(text)
    code = fenced.group(1) if fenced else text
    return code + _DOCTEST_HARNESS.format(examples=doctest_examples(meta))


def doctest_passes(metas: Sequence[Any], texts: Sequence[str], stopped: np.ndarray, *, timeout_s: float = 10.0,
                   workers: int | None = None) -> np.ndarray:
    """1.0 where the response's code passes its prompt's doctest (meta: the stub or bare examples), run in
    `internlm2_jax/sandbox` (own process, limits, no network), else 0.0 (failed, timed out, or did not compile)."""
    programs = []
    for row, (meta, text) in enumerate(zip(metas, texts, strict=True)):
        if not isinstance(meta, str) or ">>>" not in doctest_examples(meta):
            raise ValueError(f"rule 'doctest': row {row}'s meta {meta!r} holds no doctest examples; it must be the "
                             "function stub with its doctest, or bare '>>>' examples")
        programs.append(doctest_program(meta, text))
    if not programs:
        return np.zeros(0, np.float32)
    # Threads are enough: each waits on its own sandbox process.
    with ThreadPoolExecutor(workers or min(len(programs), len(os.sched_getaffinity(0)))) as pool:
        results = list(pool.map(lambda program: run_program(program, timeout_s=timeout_s), programs))
    return np.asarray([result.status == "passed" for result in results], np.float32)


_RULES: dict[str, RuleFn] = {"exact": exact_match, "doctest": doctest_passes}


def register_rule(name: str, fn: RuleFn, *, replace: bool = False) -> None:
    """Makes `fn(metas, texts, stopped) -> [rows]` available as `rule(name, tokenizer)` (config `rule:<name>`)."""
    if name in _RULES and not replace:
        raise ValueError(f"a rule named {name!r} is already registered (pass replace=True)")
    _RULES[name] = fn


def rule(name: str, tokenizer) -> RuleReward:
    """The registered rule `name` as a reward source decoding with `tokenizer`."""
    if name not in _RULES:
        raise ValueError(f"unknown rule {name!r}; known rules: {', '.join(sorted(_RULES))}")
    return RuleReward(_RULES[name], tokenizer, name)


# ---- per-domain dispatch ------------------------------------------------------------------------------------------


def mixed_reward(sources: Mapping[str, RewardSource], domains: Sequence[str]) -> RewardSource:
    """A reward source that scores each prompt's rows with `sources[its domain name]`, else `sources["*"]` (which
    also takes prompts without a domain). Each source sees only its prompts (a prompt-major sub-batch), so an RM never
    scores the rows a rule judges, and a rule never sees another domain's metas."""
    domains = tuple(domains)
    unknown = sorted(set(sources) - set(domains) - {"*"})
    if unknown:
        raise ValueError(f"reward sources for unknown domains {unknown}; the domains are {domains} (and '*')")

    def reward(batch: PromptBatch, rollout: Rollout) -> np.ndarray:
        group = group_size(batch, rollout)
        routes: dict[str, list[int]] = {}
        for b, d in enumerate(np.asarray(batch.domain_ids).tolist()):
            if not -1 <= d < len(domains):
                raise ValueError(f"prompt {b} has domain id {d}, outside the {len(domains)} domains {domains}")
            name = domains[d] if d >= 0 else None
            key = name if name in sources else "*"
            if key not in sources:
                raise ValueError(f"prompt {b} (domain {name if name is not None else 'none (-1)'}) has no reward "
                                 f"source; sources: {sorted(sources)} (add '*' for a fallback)")
            routes.setdefault(key, []).append(b)
        out = np.zeros(batch.size * group, np.float32)
        for key, prompts in routes.items():
            rows = (np.asarray(prompts)[:, None] * group + np.arange(group)).ravel()
            out[rows] = sources[key](*take_prompts(batch, rollout, prompts))
        return out

    return reward
