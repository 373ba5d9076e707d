"""The CIBench-like inferencer (agents.md §1.8, §3): each generated notebook (`agents.tasks.cibench`) is one
multi-turn conversation with the code interpreter over one sandboxed `PythonSession`, whose variables and files
persist from step to step as in a notebook; its table is in `data/` and announced in a `user name=file` turn.

Each markdown step is a user turn continuing the same conversation; the model's turns for it run through
`agents.loop.run_agents` (one batch per step across the notebooks). Two modes, as CIBench has them:
- "end_to_end": the conversation goes on from the model's own earlier turns;
- "oracle" (OpenCompass's `every_with_gt`): after the model's attempt at a step, the step's gold code runs in the
  same session (so later steps start from the gold state; variables the gold code sets win) and the history shows
  the gold code as the assistant's call and its output as the environment's answer, not the model's turns.

References: the gold code run in a fresh sandbox session per notebook (outputs, and figures rendered by the same
matplotlib). Scores per step (CIBench's, pooled over steps, i.e. weighted by step counts):
- `tool_rate`: the step made an interpreter call; `executable`: its last call raised nothing. The output scored is
  that last call's stdout and value (none when it failed);
- `num` steps: `numeric_correct`: the output's numbers, in order, are the reference's (same count, each within
  rel 1e-6); `numeric_lenient`: CIBench's `out.strip() == target.strip() or target in out` (target stripped);
- `text` steps: `text_score`, ROUGE-1 F1 of lower-cased alphanumeric unigrams;
- `vis` steps: `vis_sim`, SSIM of the step's last shown figure against the gold figure (grayscale; the prediction
  resized to the gold's size by nearest neighbour; 7x7 uniform window, sample covariance, mean over the valid
  region: scikit-image's defaults; floored at 0), and `vis_structure`: the figures agree on the number of axes, bars
  and points, as read from a JSON sidecar that a hook on `Figure.savefig` writes into the session (the model's code
  could forge it, as it could any output: it fools only its own score);
- `exec` steps count for `tool_rate` and `executable` only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import stat
import sys
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any

import numpy as np

from internlm2_jax.agents.loop import AgentResult, run_agents
from internlm2_jax.agents.protocol import INTERPRETER_PROMPT_EN, Call, ToolResult, cap, result_turn
from internlm2_jax.agents.tasks import EVAL_SEED_START
from internlm2_jax.agents.tasks.cibench import NOTEBOOK_VERSION, Notebook, Step, generate_notebooks
from internlm2_jax.agents.tools import PythonTool, ToolExecutor
from internlm2_jax.agents.tools.python import to_result
from internlm2_jax.eval.agent import AgentTaskConfig, engine_client, shown_outputs, trajectory_messages
from internlm2_jax.eval.postprocess import check_extraction
from internlm2_jax.sandbox import PythonSession, SandboxError, SandboxPolicy

MODES = ("end_to_end", "oracle")
# Per step; a score that does not apply to the step's tag is None.
SCORES = ("tool_rate", "executable", "numeric_correct", "numeric_lenient", "text_score", "vis_sim", "vis_structure")
METRICS = (*SCORES, "no_answer_rate", "mean_turns")
NUMERIC_REL_TOL = Fraction(1, 10**6)
SSIM_WINDOW = 7
MAX_FIGURE_PIXELS = 4096 * 4096  # a larger "figure" is not decoded (the model wrote that file, not matplotlib)
MAX_FIGURE_BYTES = 16 * 2**20
_FIGURE_NAME = re.compile(r"fig-\d+\.png")
# Run in every session before any notebook code, in a namespace of its own (the notebook's stays clean): after
# `plt.show` saves fig-NNN.png (sandbox.worker), the figure's structure goes to .cibench/fig-NNN.json.
_FIGURE_HOOK = '''
import json, os, re
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

def structure(figure):
    axes = figure.get_axes()
    return {"axes": len(axes),
            "bars": sum(len(c) for ax in axes for c in ax.containers if isinstance(c, BarContainer)),
            "points": sum(len(c.get_offsets()) for ax in axes for c in ax.collections)
            + sum(len(line.get_xdata()) for ax in axes for line in ax.get_lines())}

def savefig(self, fname, *args, _save=Figure.savefig, **kwargs):
    _save(self, fname, *args, **kwargs)
    if isinstance(fname, str) and re.fullmatch(r"fig-\\d+\\.png", fname):
        os.makedirs(".cibench", exist_ok=True)
        with open(os.path.join(".cibench", fname[:-4] + ".json"), "w") as f:
            json.dump(structure(self), f)

Figure.savefig = savefig
'''
_HOOK_CELL = f"exec(compile({_FIGURE_HOOK!r}, '<cibench-figures>', 'exec'), {{}})"


@dataclasses.dataclass(frozen=True)
class CIBenchTaskConfig:
    mode: str = "end_to_end"
    n: int = 20  # notebooks
    seed: int = EVAL_SEED_START
    meta: str | None = None  # a plain system turn before the interpreter's
    interpreter_prompt: str = INTERPRETER_PROMPT_EN
    max_turns: int = 3  # per step (CIBench's CIReAct: max_turn=3)
    max_repeats: int = 3
    max_parse_errors: int = 3
    max_new_tokens: int = 512
    sandbox: SandboxPolicy = SandboxPolicy()
    trajectory_chars: int = 2000  # each recorded message and output is capped to this
    batch: int = 16  # notebooks run together (each holds two sandbox sessions at most)

    def validate(self, where: str) -> None:
        checks = {"mode": self.mode in MODES, "n": self.n >= 1, "batch": self.batch >= 1,
                  "seed": self.seed >= EVAL_SEED_START, "trajectory_chars": self.trajectory_chars >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{where}: agent.{name} has an invalid value ({getattr(self, name)!r})")
        self.agent_task().validate(where)

    def agent_task(self) -> AgentTaskConfig:
        """The agent-mode settings each step runs with (system turns, limits, decoding, sandbox)."""
        return AgentTaskConfig(mode="agent", interpreter=True, meta=self.meta,
                               interpreter_prompt=self.interpreter_prompt, max_turns=self.max_turns,
                               max_repeats=self.max_repeats, max_parse_errors=self.max_parse_errors,
                               max_new_tokens=self.max_new_tokens, sandbox=self.sandbox,
                               trajectory_chars=self.trajectory_chars, batch=self.batch)

    def setting(self) -> dict[str, Any]:
        """What the prompt hash covers: the agent settings, the mode, the notebooks' generator and the scoring."""
        return {**self.agent_task().setting(),
                "cibench": {"mode": self.mode, "version": NOTEBOOK_VERSION, "fingerprint": notebooks_fingerprint(),
                            "scoring": {"numeric_rel_tol": str(NUMERIC_REL_TOL), "ssim_window": SSIM_WINDOW}}}


def notebooks_fingerprint() -> str:
    """A digest of the first notebooks at the first evaluation seed and their file turns: changes with the
    generator even when nobody bumps its version."""
    notebooks = generate_notebooks(3, EVAL_SEED_START)
    blob = json.dumps([[dataclasses.asdict(nb), file_turn(nb)] for nb in notebooks], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_turn(notebook: Notebook) -> dict[str, str]:
    """InternLM2's attachment turn: `user name=file` with the files' paths and sizes as JSON."""
    files = [{"path": path, "size": f"{len(text.encode()) / 1024:.1f}K"} for path, text in notebook.files.items()]
    return {"role": "user", "name": "file", "content": json.dumps(files)}


# ---- the notebook's session ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str  # fig-NNN.png in the work directory
    png: bytes
    structure: Mapping[str, int] | None  # {"axes", "bars", "points"} from the sidecar; None without a valid one


@dataclasses.dataclass(frozen=True)
class CellRun:
    result: ToolResult
    figures: tuple[Figure, ...]  # the figures the cell showed, read back right after it ran


def _read_regular(directory: str, *parts: str, limit: int) -> bytes | None:
    """A regular file under `directory` (which the sandbox cannot move), never through a link the sandboxed code
    may have planted there, nor a FIFO; None when absent, odd or over `limit` bytes."""
    fds = [os.open(directory, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for part in parts[:-1]:
            fds.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
        fds.append(os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fds[-1]))
        if not stat.S_ISREG(os.fstat(fds[-1]).st_mode):
            return None
        data = os.read(fds[-1], limit + 1)
        return data if len(data) <= limit else None
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)


def _install_hook(session: PythonSession) -> None:
    hook = session.run(_HOOK_CELL)
    if hook.status != "ok":
        raise SandboxError(f"the figure hook failed in the sandbox (is matplotlib installed?): {hook.error}")


class NotebookSession:
    """One notebook's sandboxed session: started at the first cell with the notebook's files and the figure hook,
    so a model that never runs code starts no process. Its guards are added to `guards`."""

    def __init__(self, notebook: Notebook, policy: SandboxPolicy, guards: set[str]):
        self.notebook, self.policy, self.guards = notebook, policy, guards
        self.session: PythonSession | None = None

    def run(self, code: str) -> CellRun:
        try:
            if self.session is None:
                files = {path: text.encode() for path, text in self.notebook.files.items()}
                session = PythonSession(self.policy, files=files)
                try:
                    _install_hook(session)
                except SandboxError:
                    session.close()
                    raise
                self.session = session
                self.guards.update(session.guards)
            cell = self.session.run(code)
            if not cell.state_kept:  # the interpreter was replaced (now, or the next cell starts a new one)
                _install_hook(self.session)
        except SandboxError as e:
            return CellRun(ToolResult(status="sandbox_error", error=str(e)), ())
        return CellRun(to_result(cell), tuple(self._figure(name) for name in cell.images
                                              if _FIGURE_NAME.fullmatch(name)))

    def _figure(self, name: str) -> Figure:
        work = self.session.work
        png = _read_regular(work, name, limit=MAX_FIGURE_BYTES) or b""
        sidecar = _read_regular(work, ".cibench", name[:-4] + ".json", limit=4096)
        try:
            structure = json.loads(sidecar) if sidecar else None
        except ValueError:
            structure = None
        valid = isinstance(structure, dict) and set(structure) == {"axes", "bars", "points"} and all(
            type(v) is int for v in structure.values())
        return Figure(name, png, structure if valid else None)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


class _StepInterpreter:
    """The interpreter as one step's agent run sees it: calls go to the notebook's session and are kept for
    scoring the step."""

    parameters = PythonTool.parameters

    def __init__(self, session: NotebookSession):
        self.session, self.runs = session, []

    def __call__(self, code: str) -> ToolResult:
        run = self.session.run(code)
        self.runs.append(run)
        return run.result

    def close(self) -> None:
        """The step's run is over; the notebook's session lives on for the next step (`NotebookSession.close`)."""


@dataclasses.dataclass(frozen=True)
class GoldStep:
    output: str  # stdout and value, as `output_text` gives them
    figure: Figure | None


def gold_steps(notebook: Notebook, policy: SandboxPolicy, guards: set[str]) -> list[GoldStep]:
    """The reference of every step: the gold code run in order in a fresh session. A failing gold cell, a `num`
    step without a number or a `vis` step without a figure is the generator's bug and raises."""
    session = NotebookSession(notebook, policy, guards)
    golds = []
    try:
        for index, step in enumerate(notebook.steps):
            run = session.run(step.code)
            where = f"{notebook.id} step {index} ({step.kind})"
            if run.result.status != "ok":
                raise ValueError(f"{where}: the gold code failed ({run.result.status}): {run.result.error}")
            gold = GoldStep(output_text(run.result), run.figures[-1] if run.figures else None)
            if (step.tag == "num" and not numbers(gold.output)) or (step.tag == "vis" and (
                    gold.figure is None or gold.figure.structure is None)):
                raise ValueError(f"{where}: the gold code gave no {'number' if step.tag == 'num' else 'figure'}")
            golds.append(gold)
    finally:
        session.close()
    return golds


# ---- scoring ------------------------------------------------------------------------------------------------------


def output_text(result: ToolResult) -> str:
    """What a cell showed, as a notebook shows it: stdout, then the last expression's value."""
    value = result.value if result.value is None or isinstance(result.value, str) else repr(result.value)
    return "\n".join(part.rstrip("\n") for part in (result.stdout, value) if part)


# A number not glued to a word ("float64", "s05" are not numbers), optionally with an exponent.
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\w|\.\d)")


def numbers(text: str) -> list[Fraction]:
    return [Fraction(token) for token in _NUMBER.findall(text)]


def numeric_correct(output: str, reference: str) -> bool:
    """The numbers of `output`, in order, are those of `reference`: as many, each within rel 1e-6."""
    got, want = numbers(output), numbers(reference)
    return bool(want) and len(got) == len(want) and all(
        abs(g - w) <= NUMERIC_REL_TOL * max(abs(g), abs(w)) for g, w in zip(got, want, strict=True))


def numeric_lenient(output: str, reference: str) -> bool:
    """CIBench's rule: the outputs are equal, or the (stripped) reference occurs in the output."""
    target = reference.strip()
    return bool(target) and (output.strip() == target or target in output)


def rouge1(prediction: str, reference: str) -> float:
    """ROUGE-1 F1: unigram overlap (clipped counts) of lower-cased alphanumeric tokens; 0 when either is empty."""
    got, want = (Counter(re.findall(r"[a-z0-9]+", text.lower())) for text in (prediction, reference))
    overlap = sum((got & want).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(got.values()), overlap / sum(want.values())
    return 2 * precision * recall / (precision + recall)


def grayscale(png: bytes) -> np.ndarray | None:
    """A PNG as a float grayscale image in [0, 1] (alpha composited over white, ITU-R 601 luma); None when it is not
    a PNG, is larger than `MAX_FIGURE_PIXELS` (read from its header, before decoding) or does not decode."""
    from PIL import Image  # matplotlib's own image library; only the vis score needs it

    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    try:
        with Image.open(io.BytesIO(png), formats=("PNG",)) as image:
            if not 0 < image.width * image.height <= MAX_FIGURE_PIXELS:
                return None
            pixels = np.asarray(image.convert("RGBA"), dtype=np.float64) / 255
    except (OSError, SyntaxError, ValueError, zlib.error):  # what Pillow raises for a corrupt or truncated PNG
        return None
    alpha = pixels[..., 3:]
    return (pixels[..., :3] * alpha + (1.0 - alpha)) @ np.array([0.299, 0.587, 0.114])


def _box_mean(x: np.ndarray, window: int) -> np.ndarray:
    """The mean over every window x window square that fits (valid positions), from an integral image."""
    c = np.pad(x, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    w = window
    return (c[w:, w:] - c[:-w, w:] - c[w:, :-w] + c[:-w, :-w]) / (w * w)


def ssim(a: np.ndarray, b: np.ndarray, *, window: int = SSIM_WINDOW, data_range: float = 1.0) -> float:
    """Mean structural similarity (Wang et al. 2004) of two grayscale images of the same shape, as scikit-image's
    `structural_similarity` computes it by default: uniform window, sample covariance, constants K1 = 0.01 and
    K2 = 0.03, averaged over the positions where the window fits."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"ssim: images must be 2-D and of one shape, got {a.shape} and {b.shape}")
    if min(a.shape) < window:
        raise ValueError(f"ssim: images of {a.shape} are smaller than the {window}x{window} window")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mean = lambda x: _box_mean(x, window)  # noqa: E731
    ua, ub = mean(a), mean(b)
    sample = window * window / (window * window - 1)
    va, vb, cov = sample * (mean(a * a) - ua * ua), sample * (mean(b * b) - ub * ub), sample * (mean(a * b) - ua * ub)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ua * ub + c1) * (2 * cov + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    return float(s.mean())


def vis_similarity(png: bytes, gold_png: bytes) -> float:
    """`ssim` of a figure against the gold one (module docstring); 0 for a figure that does not decode."""
    gold, got = grayscale(gold_png), grayscale(png)
    if gold is None:
        raise ValueError("vis_similarity: the gold figure is not a PNG")
    if got is None:
        return 0.0
    if got.shape != gold.shape:  # nearest neighbour onto the gold's grid
        rows = np.arange(gold.shape[0]) * got.shape[0] // gold.shape[0]
        cols = np.arange(gold.shape[1]) * got.shape[1] // gold.shape[1]
        got = got[rows][:, cols]
    return max(0.0, ssim(got, gold))


def score_step(step: Step, gold: GoldStep, runs: Sequence[CellRun]) -> dict[str, float | None]:
    """The step's scores (module docstring); the scores of other tags are None."""
    scores: dict[str, float | None] = dict.fromkeys(SCORES)
    last = runs[-1] if runs else None
    executable = last is not None and last.result.status == "ok"
    output = output_text(last.result) if executable else ""
    scores.update(tool_rate=float(bool(runs)), executable=float(executable))
    if step.tag == "num":
        scores.update(numeric_correct=float(numeric_correct(output, gold.output)),
                      numeric_lenient=float(numeric_lenient(output, gold.output)))
    elif step.tag == "text":
        scores["text_score"] = rouge1(output, gold.output) if executable else 0.0
    elif step.tag == "vis":
        figure = next((f for run in reversed(runs) for f in reversed(run.figures)), None)
        shown = executable and figure is not None
        scores["vis_sim"] = vis_similarity(figure.png, gold.figure.png) if shown else 0.0
        scores["vis_structure"] = float(shown and figure.structure == gold.figure.structure)
    return scores


def cibench_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Each score averaged over the steps that have it (CIBench's pooling: weighted by step counts); None for a
    tag no step has."""
    if not rows:
        raise ValueError("cibench_metrics: no rows")
    metrics = {}
    for key in SCORES:
        values = [r[key] for r in rows if r[key] is not None]
        metrics[key] = sum(values) / len(values) if values else None
    metrics["no_answer_rate"] = sum(not r["answer"].strip() for r in rows) / len(rows)
    metrics["mean_turns"] = sum(r["turns"] for r in rows) / len(rows)
    return metrics


# ---- the inferencer -----------------------------------------------------------------------------------------------


def _row(notebook: Notebook, index: int, gold: GoldStep, runs: Sequence[CellRun], result: AgentResult,
         first: int, chars: int) -> dict[str, Any]:
    step = notebook.steps[index]
    last = runs[-1].result if runs else None
    return {"id": f"{notebook.id}/{index}", "notebook": notebook.id, "table": notebook.table, "step": index,
            "tag": step.tag, "kind": step.kind, "prompt": step.prompt, "reference": cap(gold.output, chars),
            "output": cap(output_text(last), chars) if last is not None else "", "answer": result.answer or "",
            "stop": result.stop, "turns": result.state.turns, "calls": len(runs),
            **score_step(step, gold, runs), "trajectory": trajectory_messages(result.messages[first:], chars)}


def _gold_turns(session: NotebookSession, step: Step, limit_chars: int) -> list[dict[str, Any]]:
    """Oracle mode: the step's gold code run in the notebook's session, as the assistant's call and its answer."""
    run = session.run(step.code)
    call = Call("interpreter", PythonTool.name, {"code": step.code}, step.code)
    return [{"role": "assistant", "content": "", "tool_call": {"type": "interpreter", "code": step.code}},
            result_turn(call, run.result, limit_chars=limit_chars)]


def _run_notebooks(client, tokenizer, notebooks: Sequence[Notebook], config: CIBenchTaskConfig,
                   guards: set[str]) -> list[dict[str, Any]]:
    agent = config.agent_task()
    agent_config, system = agent.agent_config(), len(agent.system())
    sessions = [NotebookSession(nb, config.sandbox, guards) for nb in notebooks]
    histories = [[file_turn(nb)] for nb in notebooks]
    rows = []
    # The references are computed while the model works on the first steps (each waits on a sandbox process).
    with ThreadPoolExecutor(min(len(notebooks), len(os.sched_getaffinity(0)))) as pool:
        golds = [pool.submit(gold_steps, nb, config.sandbox, guards) for nb in notebooks]
        try:
            for k in range(max(len(nb.steps) for nb in notebooks)):
                active = [i for i, nb in enumerate(notebooks) if k < len(nb.steps)]
                interpreters = [_StepInterpreter(sessions[i]) for i in active]
                # run_agents makes one executor per question, in question order, and closes it when the step ends.
                executors = map(lambda interpreter: ToolExecutor(interpreter=interpreter), interpreters)
                questions = [[*histories[i], {"role": "user", "content": notebooks[i].steps[k].prompt}]
                             for i in active]
                results = run_agents(client, tokenizer, executors.__next__, questions, config=agent_config)
                for i, interpreter, result in zip(active, interpreters, results, strict=True):
                    step = notebooks[i].steps[k]
                    rows.append(_row(notebooks[i], k, golds[i].result()[k], interpreter.runs, result,
                                     system + len(histories[i]), config.trajectory_chars))
                    if config.mode == "oracle":
                        histories[i] += [{"role": "user", "content": step.prompt},
                                         *_gold_turns(sessions[i], step, agent_config.limits.max_result_chars)]
                    else:
                        histories[i] = list(result.messages[system:])
        finally:
            for future in golds:
                future.cancel()
            for session in sessions:
                session.close()
    return rows


def run_cibench_task(model, tokenizer, task, *, client=None, progress: bool = False) -> dict[str, Any]:
    """Runs `task` (an `eval.tasks.Task` with `inferencer="cibench"`) and scores it (module docstring). `client`
    replaces the model's engine (a test's `ScriptedClient`, a server). One row per step; fails like the GEN
    inferencer when more than `task.max_empty_share` of the steps end without an answer."""
    task.validate()
    config: CIBenchTaskConfig = task.agent
    notebooks = generate_notebooks(config.n, config.seed)
    if client is None:
        client = engine_client(model, tokenizer, config.agent_task(), problems=len(notebooks))
    guards: set[str] = set()
    rows: list[dict[str, Any]] = []
    for start in range(0, len(notebooks), config.batch):
        rows += _run_notebooks(client, tokenizer, notebooks[start:start + config.batch], config, guards)
        if progress:
            print(f"{task.name}: {min(start + config.batch, len(notebooks))}/{len(notebooks)} notebooks",
                  file=sys.stderr, flush=True)
    check_extraction([r["answer"] for r in rows], max_empty_share=task.max_empty_share, dataset=task.name,
                     outputs=shown_outputs(rows))
    by_table = {table: cibench_metrics([r for r in rows if r["table"] == table])
                for table in sorted({r["table"] for r in rows})}
    return {"task": task.name, "group": task.group, "prompt_hash": task.prompt_hash(), "mode": config.mode,
            "rows": len(rows), "notebooks": len(notebooks), **cibench_metrics(rows), "by_table": by_table,
            "seed": config.seed, "guards": sorted(guards), "details": rows}
