"""notebooks/quickstart.ipynb, data_and_decoding.ipynb, reward_model.ipynb, serving.ipynb, long_context.ipynb,
rlhf.ipynb, agents.ipynb and quantization.ipynb execute top to bottom through a real Jupyter kernel (nbclient + ipykernel).

The kernel is this interpreter: a kernelspec naming `sys.executable` is written to a temporary folder put first on
JUPYTER_PATH, so neither a `python3` kernel installed elsewhere on the machine nor a missing one changes what runs.
(`notebooks/attention_kernels.ipynb` has its own test in test_kernels_artifacts.py.)
"""

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL = "internlm2-jax-tests"
EIGHT_DEVICES = 'jax.config.update("jax_num_cpu_devices", 8)'


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "internlm2-jax tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return KERNEL


def run_notebook(name: str, kernel_name: str, workdir: Path, timeout: int, first_cell: str | None = None):
    """Executes notebooks/`name` in `workdir` (raises on a failing cell): (its outputs, their text). `first_cell`:
    a line its first code cell must hold."""
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    if first_cell is not None:
        assert first_cell in next(c for c in notebook.cells if c.cell_type == "code").source
    NotebookClient(notebook, timeout=timeout, kernel_name=kernel_name,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    return outputs, "".join(o.get("text", "") for o in outputs)


def test_quickstart_notebook_executes(kernel_name, tmp_path):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    outputs, text = run_notebook("quickstart.ipynb", kernel_name, workdir, 240, first_cell=EIGHT_DEVICES)
    assert "8 devices" in text
    assert "bitwise equal = True" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the inline loss plot
    start, end = map(float, re.search(r"loss (\d+\.\d+) -> (\d+\.\d+) \(uniform", text).groups())
    assert end < start - 0.5  # it learned


def test_data_and_decoding_notebook_executes(kernel_name, tmp_path):
    outputs, text = run_notebook("data_and_decoding.ipynb", kernel_name, tmp_path, 240)
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| fuzzy_dedup |" in markdown
    assert "exact_duplicate" in text and "duplicate of " in text and "malformed_json" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the LSH detection curve
    assert "duplicates: [40] of 41" in text


@pytest.mark.slow  # ~70 s; the default run keeps under 30 min (reward training has its own default tests)
def test_reward_model_notebook_trains_and_inspects_the_tiny_reward_model(kernel_name, tmp_path):
    """Acceptance for the conditional reward model: held-out accuracy well above chance, and the margin between the
    detailed answer and the refusal flips sign with the system prompt on held-out requests."""
    outputs, text = run_notebook("reward_model.ipynb", kernel_name, tmp_path, 600)
    assert "8 devices" in text and "[UNUSED_TOKEN_130]" in text
    accuracy = float(re.search(r"held-out pairwise accuracy (\d\.\d+)", text).group(1))
    flip = float(re.search(r"conditional flip rate (\d\.\d+)", text).group(1))
    assert accuracy > 0.75 and flip > 0.8, text
    assert "HF export reloads bit-exact: True" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # training curves and score histograms


def test_serving_notebook_loads_a_run_onto_a_mesh_and_serves_the_openai_client(kernel_name, tmp_path):
    outputs, text = run_notebook("serving.ipynb", kernel_name, tmp_path, 300, first_cell=EIGHT_DEVICES)
    assert "8 devices" in text and "on mesh {'data': 2, 'fsdp': 1, 'tensor': 4, 'sequence': 1}" in text, text
    assert "same tokens as generate: [True, True, True]" in text, text
    assert "models: ['tiny']" in text and "32 requests, 0 failed" in text, text
    assert re.search(r"time to first token: p50 \d+\.\d+ s", text), text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the latency percentiles


@pytest.mark.slow  # ~90 s; the default run keeps under 30 min
def test_long_context_notebook_shows_the_layout_the_tile_balance_and_the_heat_maps(kernel_name, tmp_path):
    outputs, text = run_notebook("long_context.ipynb", kernel_name, tmp_path, 300)
    assert "8 devices" in text and "zigzag:  0  1  2  3 28 29 30 31" in text, text
    assert re.search(r"sp=4 +zigzag: .* max/min 1\.0\d", text), text
    phases = re.search(r"phase 1: (\d+) steps at (\d+) tokens; phase 2 went on to step (\d+) at (\d+) tokens", text)
    assert phases, text  # phase 2 restored phase 1's step and went on, at 4x the length
    assert int(phases[3]) > int(phases[1]) and int(phases[4]) == 4 * int(phases[2]), phases[0]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5  # layout, tiles, three heat maps


# ~110 s: the default run keeps under 30 min; tests/test_rl_loop.py runs the same PPO loop on its own
@pytest.mark.slow
def test_rlhf_notebook_runs_a_ppo_round_with_its_curves_and_samples(kernel_name, tmp_path):
    """Issue 21 acceptance 9: one PPO round on the tiny model, the reward/KL curves, samples before and after."""
    outputs, text = run_notebook("rlhf.ipynb", kernel_name, tmp_path, 900, first_cell=EIGHT_DEVICES)
    found = re.search(r"held-out pass@1: SFT (\d\.\d+) -> PPO (\d\.\d+)", text)
    assert found and float(found[2]) > float(found[1]), text
    assert "== before (iteration 1)" in text and "== after (iteration 20)" in text, text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the curves, and the loop's own PNG


# ~280 s on a loaded 2-core machine (the data, a 60-step fine-tuning run, the engine, the evaluations); the default
# run keeps under 30 min
@pytest.mark.slow
def test_agents_notebook_shows_the_protocol_a_sandboxed_session_a_tiny_agent_and_its_evaluation_table(
        kernel_name, tmp_path, monkeypatch):
    """Issue 22 acceptance 7: the protocol, one sandboxed session, one agent run with a trained tiny model, the
    evaluation table. Fewer fine-tuning steps than the notebook's default: the model only has to learn the format
    (whether it then beats direct answering is tests/test_agent_sft_tiny.py's gate)."""
    monkeypatch.setenv("AGENTS_NOTEBOOK_STEPS", "60")
    outputs, text = run_notebook("agents.ipynb", kernel_name, tmp_path, 600,
                                 first_cell='STEPS = int(os.environ.get("AGENTS_NOTEBOOK_STEPS", ')
    assert "1 cpu device; 60 steps of 8 rows" in text, text
    # The rendered prompt: both kinds of call and their environment turns, in the template's markers.
    assert ('<|im_start|>assistant\nThe calculator first.<|action_start|><|plugin|>\n{"name": "calculator", '
            '"parameters": {"expression": "2**10 - 24"}}<|action_end|>\n<|im_end|>\n'
            '<|im_start|>environment name=<|plugin|>\n1000<|im_end|>') in text, text
    assert ("<|action_start|><|interpreter|>\n```python\nprint(sum(range(1000)))\n```<|action_end|>\n<|im_end|>\n"
            "<|im_start|>environment name=<|interpreter|>\n499500<|im_end|>") in text, text
    assert "call    interpreter python {'code': 'print(sum(range(1000)))'}, error None" in text, text
    assert "in the user's ids: False" in text and "the model repeats it as text -> call None" in text, text
    # The sandboxed session: state kept across cells and across the interrupted loop; the attacks contained.
    assert re.search(r"reuse: ok +285\n", text) and re.search(r"after the loop: ok +10\n", text), text
    assert re.search(r"network: error +PermissionError", text), text
    assert re.search(r"file write: error", text) and re.search(r"infinite loop: timeout", text), text
    assert "host side: the listener was reached: False; the file exists: False" in text, text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss curve
    # The agent run and the accuracies on held-out products.
    assert re.search(r"stop: \w+; answer .*; expected \d+", text), text
    assert re.search(r"held-out accuracy on 32 products: direct \d\.\d+, agent \d\.\d+", text), text
    # The evaluation table: a row per task and metric, and the group's average per mode.
    for task in ("arith_mul-d3-direct", "arith_mul-d3-agent", "arith_mul-d4-direct", "arith_mul-d4-agent"):
        assert re.search(rf"\| {task} \| [0-9a-f]{{10}} \| accuracy \| \w+ \| \d\.\d{{4}} \|", text), text
    assert re.search(r"\| control-d1-agent \| [0-9a-f]{10} \| unnecessary_call_rate \| agent \|", text), text
    for mode in ("direct", "agent"):
        assert re.search(rf"\| \*\*products\*\* \(average of 2\) \| \w+\+\w+ \| accuracy \| {mode} \|", text), text


@pytest.mark.slow  # ~75 s: a pretraining run, AWQ calibration and 15 cached perplexities
def test_quantization_notebook_executes(kernel_name, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTIZATION_NOTEBOOK_STEPS", "30")  # pretrains its own small model, even beside a demo run
    outputs, text = run_notebook("quantization.ipynb", kernel_name, tmp_path, 600)
    nf4 = float(re.search(r"NF4 on the normal tensor: ([0-9.]+)", text).group(1))
    assert 0.070 < nf4 < 0.078  # bitsandbytes' 0.0728 at block 64, plus double quantization's share
    table = [line for line in text.splitlines() if re.match(r"\| (float|int8|int4|NF4)", line)]
    assert len(table) == 15 and all(re.search(r"\| [0-9.]+ \| [+-][0-9.]+% \|", line) for line in table)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
