"""The README's commands work as written on a newcomer's machine: one CPU device, no fake-device flags.

Every command of the README's ```bash blocks is found here and checked: `python -m internlm2_jax.<module> ...`
commands run in a subprocess (JAX_PLATFORMS=cpu, XLA_FLAGS removed, a scratch directory that links the repository's
`experiments/`, as the repository root would), in README order so that a later command finds what an earlier one
wrote; training runs are shortened only with `--set train.steps=3 --set data.eval_batches=2`, as the README says.
A new README command therefore runs in the default test run unless it is listed below as slow or illustrative.
The flags of the inline `python -m internlm2_jax.<module> ...` commands in the prose exist in the module's --help.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SHORTEN = ("--set", "train.steps=3", "--set", "data.eval_batches=2")  # what the README says the tests may add

# Commands that run only with `-m slow` (minutes each), by a piece of their text; `--topology` ones are slow too.
SLOW = {
    "experiments/sft_tiny.py": "SFT data, tokenizer, training and a generated reply (about a minute even shortened)",
    "experiments/reward_tiny.py": "pair data, tokenizer, training, a held-out report and an HF export",
    "experiments/dpo_tiny.py": "needs the sft_tiny run, then preference rates before and after",
    "experiments/ppo_tiny.py": "noisy-demo SFT, then 40 PPO iterations with the sandboxed doctest reward (minutes)",
    "experiments/grpo_tiny.py": "the ppo_tiny SFT, then 40 GRPO iterations (minutes)",
    "experiments/cool_rlhf_tiny.py": "reward_tiny's RM, an SFT, PPO per domain and a hacking round (~9 minutes)",
}
# Commands whose inputs are the user's own (nothing to run them on here): only their flags are checked.
ILLUSTRATIVE = {
    "python -m internlm2_jax.data.curate --input jsonl:crawl/": "curates the user's crawl (crawl/, repos/)",
}
# A command that needs an earlier README command's output (a piece of its text -> a piece of the earlier one's).
NEEDS = {
    "internlm2_jax.convert runs/pretrain_tiny": "experiments/pretrain_tiny.py --set train.steps=100",
    "experiments/dpo_tiny.py": "experiments/sft_tiny.py",
}
# `make` targets the README shows, and where their work is checked.
MAKE_TARGETS = {
    "demo": "tests/test_demo.py runs its launch command, shortened",
    "test": "the test suite itself",
}


def bash_commands(text: str = README) -> list[str]:
    """Each command of the ```bash blocks, continuation lines joined and comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def inline_commands(text: str = README) -> list[str]:
    """The `python -m internlm2_jax.<module> ...` commands quoted in the prose."""
    return [" ".join(c.split()) for c in re.findall(r"`(python -m internlm2_jax\.[^`]+)`", text)]


def slow_reason(command: str) -> str | None:
    if "--topology" in command:
        return "compiles a 7B step for a TPU pod with the TPU compiler"
    return next((why for key, why in SLOW.items() if key in command), None)


def subprocess_env(command: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    if "--topology" in command:
        env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # another test may hold libtpu's lock
    return env


def cases() -> list:
    params = []
    for command in bash_commands():
        if any(command.startswith(key) for key in ILLUSTRATIVE):
            continue  # test_illustrative_commands_are_still_in_the_readme_and_their_flags_exist
        why = slow_reason(command)
        marks = [pytest.mark.slow] if why else []
        short = command.replace("python -m internlm2_jax.", "").replace("experiments/", "")
        params.append(pytest.param(command, marks=marks, id=re.sub(r"[^\w.=:-]+", "_", short)[:100]))
    return params


class Workdir:
    """One scratch 'repository root' for the whole module: commands run there once each, in README order."""

    def __init__(self, path: Path):
        self.path, self.done = path, {}
        (path / "experiments").symlink_to(ROOT / "experiments")

    def run(self, command: str) -> subprocess.CompletedProcess:
        if command not in self.done:
            for key, needed in NEEDS.items():
                if key in command:
                    earlier = [c for c in bash_commands() if needed in c]
                    assert earlier, f"{command!r} needs a README command with {needed!r}, and there is none"
                    assert self.run(earlier[0]).returncode == 0, f"{earlier[0]!r} failed first"
            self.done[command] = run_as_written(command, self.path)
        return self.done[command]


def run_as_written(command: str, cwd: Path, *, shorten: bool = True) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"] and words[2].startswith("internlm2_jax."), (
        f"README command {command!r}: this test only knows `python -m internlm2_jax.<module> ...` (and `make`); "
        "teach it how to check this one")
    if words[2] == "internlm2_jax.launch" and "--compile-only" not in words and shorten:
        words += SHORTEN
    if "--topology" in words and importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu (requirements-test.txt) provides the TPU compiler")
    timeout = 1800 if slow_reason(command) else 300
    return subprocess.run([sys.executable, *words[1:]], cwd=cwd, env=subprocess_env(command), capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Workdir:
    return Workdir(tmp_path_factory.mktemp("readme"))


def test_the_readme_shows_commands_and_the_lists_here_are_current():
    commands = bash_commands()
    launches = [c for c in commands if c.startswith("python -m internlm2_jax.launch ")]
    assert len(launches) >= 5 and any(c.startswith("make demo") for c in commands)
    for key in [*SLOW, *NEEDS, *NEEDS.values(), *ILLUSTRATIVE, *(f"make {target}" for target in MAKE_TARGETS)]:
        assert any(key in c for c in commands), f"{key!r} is listed in this test but no README command has it"
    # The one-device command a newcomer runs first is in the default run (not slow, not illustrative).
    assert any("pretrain_tiny.py" in c and "--cpu-devices" not in c and not slow_reason(c) for c in launches)
    assert any("--cpu-devices" in c for c in launches), "the README shows no mesh command for a CPU machine"


@pytest.mark.parametrize("command", cases())
def test_readme_command_runs_as_written(command, workdir):
    if command.startswith("make "):
        target = shlex.split(command)[1]
        assert target in MAKE_TARGETS, f"`{command}` in the README: say in MAKE_TARGETS where its work is checked"
        makefile = (ROOT / "Makefile").read_text()
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"the Makefile has no target {target!r}"
        if target == "demo":  # what tests/test_demo.py runs, shortened
            assert "-m internlm2_jax.launch experiments/tiny_chain.py" in makefile
            assert "experiments/tiny_chain.py" in (ROOT / "tests" / "test_demo.py").read_text()
        return
    done = workdir.run(command)
    assert done.returncode == 0, f"{command}\n{done.stderr[-4000:]}"
    if "--topology" in command:  # the README's pod recipes fit their chips
        assert re.search(r"^  fits +True$", done.stdout, flags=re.M), done.stdout[-2000:]
    elif command.startswith("python -m internlm2_jax.launch "):
        devices = re.search(r"--cpu-devices[ =](\d+)", command)
        ran_on = re.search(r"compiled train step for (\d+) (?:local )?cpu devices", done.stdout)
        assert ran_on and ran_on[1] == (devices[1] if devices else "1"), done.stdout[-2000:]


def test_a_mesh_that_does_not_fit_is_one_line_naming_the_fields_to_change(workdir):
    """The README's mesh command without its --cpu-devices, on the one device there is."""
    command = next(c for c in bash_commands() if c.startswith("python -m internlm2_jax.launch ")
                   and "--cpu-devices" in c)
    devices = re.search(r" --cpu-devices[ =](\d+)", command)
    done = run_as_written(command.replace(devices[0], ""), workdir.path, shorten=False)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-4000:]
    assert lines[0].startswith("error: the experiment's mesh does not fit the 1 cpu device(s) here: ")
    assert "mesh.data / mesh.fsdp with --set" in lines[0] and f"--cpu-devices {devices[1]}" in lines[0]


def test_illustrative_commands_are_still_in_the_readme_and_their_flags_exist(workdir):
    """Commands not run (their inputs are the user's): each module's --help knows every flag the README gives it."""
    illustrative = [c for c in bash_commands() if any(c.startswith(key) for key in ILLUSTRATIVE)]
    assert illustrative, "ILLUSTRATIVE lists no command of the README"
    commands = illustrative + inline_commands()
    modules = sorted({shlex.split(c)[2] for c in commands})
    helps = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT, *modules], cwd=workdir.path, env=subprocess_env(""),
        capture_output=True, text=True, timeout=300, check=False)
    assert helps.returncode == 0, helps.stderr[-4000:]
    texts = dict(zip(modules, helps.stdout.split("\0")[1:], strict=True))
    for command in commands:
        module = shlex.split(command)[2]
        for flag in re.findall(r"(?<![\w=-])--[a-z][\w-]*", command):
            assert flag in texts[module], f"README: `{command}`: {module} --help has no {flag}"


# Prints "\0" + the --help text of each module named on the command line, in one process (imports once).
HELP_SCRIPT = """
import contextlib, io, runpy, sys
for module in sys.argv[1:]:
    sys.argv, out = [module, "--help"], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code:
            raise
    print("\\0" + out.getvalue(), end="")
"""
