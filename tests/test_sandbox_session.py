"""PythonSession semantics: state across cells, the last expression's value, tracebacks without the worker's frames,
timeouts that keep the state when SIGINT works and restart the interpreter when it does not, output caps, the
minimal environment, files, reset, and nothing left running after close. The attacks are in test_sandbox_redteam."""

import importlib.util
import json
import os
import struct
import time

import pytest

from internlm2_jax.sandbox import PythonSession, SandboxPolicy, run_program
from internlm2_jax.sandbox.policy import environment


@pytest.fixture(scope="module")
def session():
    with PythonSession(SandboxPolicy(wall_s=5.0)) as s:
        yield s


def test_state_persists_and_the_last_expression_is_shown(session):
    assert session.run("x = 20\ndef f(y):\n    return x + y").value is None
    result = session.run("print('side effect')\nf(22)")
    assert (result.status, result.value, result.stdout, result.state_kept) == ("ok", "42", "side effect\n", True)
    assert session.run("None").value is None  # like a notebook: None is not displayed
    assert session.run("_").value == "42"  # the last shown value
    assert session.run("import __main__\n__main__.x").value == "20"  # pickle can find the cells' names


def test_errors_show_the_cells_frames_only(session):
    session.run("def inner():\n    return 1 / 0")
    result = session.run("inner()")
    assert result.status == "error" and result.value is None
    assert result.error.startswith("Traceback (most recent call last):")
    assert "worker.py" not in result.error and "sandbox" not in result.error
    assert '  File "<cell-' in result.error and "return 1 / 0" in result.error  # the source line is shown
    assert result.error.rstrip().endswith("ZeroDivisionError: division by zero")
    syntax = session.run("def broken(:\n")
    assert syntax.status == "error" and "SyntaxError" in syntax.error and "worker.py" not in syntax.error
    assert session.run("x").value == "20"  # errors keep the state


def test_timeout_interrupts_and_keeps_the_state(session):
    session.run("before = 'kept'")
    result = session.run("import time\ntime.sleep(30)", timeout_s=0.5)
    assert result.status == "timeout" and result.state_kept
    assert "KeyboardInterrupt" in result.error and 0.5 <= result.seconds < 2.0
    assert session.run("before").value == "'kept'"


def test_a_cell_that_ignores_sigint_is_killed_and_the_interpreter_restarts():
    with PythonSession(SandboxPolicy(wall_s=0.5, grace_s=0.3)) as s:
        s.run("before = 1\nopen('file.txt', 'w').write('survives')")
        result = s.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass")
        assert (result.status, result.state_kept) == ("timeout", False)
        assert "restarted" in result.error and result.seconds < 2.0
        after = s.run("open('file.txt').read()")
        assert (after.status, after.value, after.state_kept) == ("ok", "'survives'", True)  # work/ stays
        assert "NameError" in s.run("before").error


def test_the_interpreter_exiting_is_a_restart_with_its_exit_status():
    with PythonSession() as s:
        s.run("x = 1")
        for code, status in (("import sys\nsys.exit(3)", 3), ("import os\nos._exit(4)", 4),
                             ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", -11)):
            result = s.run(code)
            assert (result.status, result.exit_code, result.state_kept) == ("restarted", status, False), result
        assert s.run("1 + 1").value == "2"
        # Dying between cells (a thread the cell left behind): the next cell runs in a fresh interpreter and says so.
        s.run("y = 1\nimport os, threading, time\n"
              "threading.Thread(target=lambda: (time.sleep(0.2), os._exit(5))).start()")
        time.sleep(0.5)
        after = s.run("'y' in globals()")
        assert (after.status, after.value, after.state_kept) == ("ok", "False", False)


def test_output_is_capped_and_counted():
    with PythonSession(SandboxPolicy(capture_bytes=1000)) as s:
        result = s.run("import sys\nprint('o' * 5000)\nprint('e' * 3000, file=sys.stderr)\n'v' * 5000")
        assert result.stdout == "o" * 1000 and result.stderr == "e" * 1000
        assert result.truncated_bytes == 4001 + 2001
        assert result.value == repr("v" * 5000)[:1000]
        assert s.run("print('next')").stdout == "next\n"  # each cell's output starts empty


def test_environment_stdin_files_and_reset():
    with PythonSession(files={"data/input.txt": b"given"}) as s:
        env = json.loads(s.run("import os, json\njson.dumps(dict(os.environ))").value.strip("'"))
        assert env == environment(s.work)
        assert s.run("import os\nos.getcwd()").value == repr(s.work)
        assert "EOFError" in s.run("input()").error
        assert s.run("open('data/input.txt').read()").value == "'given'"
        s.run("y = 1")
        s.reset()
        assert "NameError" in s.run("y").error
        assert s.run("open('data/input.txt').read()").value == "'given'"


def test_a_forged_reply_on_the_reply_pipe_is_ignored(session):
    forged = json.dumps({"id": "guess", "status": "ok", "value": "'forged'", "error": None}).encode()
    code = (f"import os, sys\ndata = {forged!r}\nos.write(int(sys.argv[2]), {struct.pack('>I', len(forged))!r} + data)"
            "\nraise ValueError('the real result')")
    result = session.run(code)
    assert result.status == "error" and "the real result" in result.error


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plt_show_saves_figures():
    with PythonSession() as s:
        result = s.run("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()\nplt.plot([2, 1])\nplt.show()")
        assert result.status == "ok", result
        assert result.images == ("fig-001.png", "fig-002.png")
        assert all(os.path.getsize(os.path.join(s.work, name)) > 0 for name in result.images)


def test_close_leaves_no_process_and_no_directory():
    s = PythonSession()
    s.run("import subprocess\nsubprocess.Popen(['sleep', '600'])")
    assert len(s.live_processes()) == 2
    work = s.work
    s.close()
    assert s.live_processes() == [] and not os.path.exists(work)
    with pytest.raises(RuntimeError, match="closed"):
        s.run("1")
    s.close()  # twice is fine


def test_run_program_is_a_one_cell_session():
    assert run_program("x = 1\nassert x == 1\n").status == "passed"
    failed = run_program("assert 1 == 2, 'no'\n")
    assert failed.status == "failed" and "AssertionError: no" in failed.detail
    assert run_program("import sys\nsys.exit(1)\n").status == "failed"
    assert run_program("import time\ntime.sleep(10)\n", timeout_s=0.5).status == "timeout"
    result = run_program("import os\nos._exit(0)\n", allow_netns=False)
    assert (result.status, result.network_guard) == ("failed", "socket-guard")
    assert "netns" not in result.guards and "socket-guard" in result.guards


def test_a_guard_that_cannot_be_applied_stops_the_session(monkeypatch):
    from internlm2_jax.sandbox import SandboxError, session as session_module

    plan = session_module._plan
    # An open-files limit above the kernel's maximum: setrlimit refuses it, so "rlimits" cannot be applied.
    monkeypatch.setattr(session_module, "_plan", lambda *args: plan(*args) | {"limits": {"NOFILE": 2**40}})
    with pytest.raises(SandboxError, match="guard 'rlimits' could not be applied"):
        PythonSession()


def test_without_the_optional_guards_the_session_says_so_and_still_cleans_up():
    policy = SandboxPolicy(network_namespace=False, mount_namespace=False, landlock=False, drop_uid=False)
    with PythonSession(policy) as s:
        assert s.uid is None
        assert not s.guards & {"netns", "mountns", "landlock-fs", "landlock-net", "uid", "nproc"}
        assert {"rlimits", "no-new-privs", "socket-guard", "wall-clock"} <= s.guards
        # Found by its process session, which is why `setsid` escapes this mode and "uid" is not claimed.
        s.run("import subprocess\nsubprocess.Popen(['sleep', '600'])")
        assert len(s.live_processes()) == 2
    assert s.live_processes() == []
