"""The sandbox red team (docs/agents.md §4.4): attacks on `PythonSession`, each with the outcome it must have and the
guards that should stop it. One definition, used by tests/test_sandbox_redteam.py and by the command line:

    python -m internlm2_jax.agents.redteam    # prints the guard matrix; exit status 1 if an attack got through

Targets are only what the host side creates for each attack (a loopback listener, a canary directory, a secret
file, a sacrificial `sleep`); no attack leaves this machine. Destructive attacks (fork bombs) run only when the
guards that contain them are active."""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from internlm2_jax.sandbox import CellResult, PythonSession, SandboxPolicy, host_support
from internlm2_jax.sandbox.policy import environment

# Defined in each attack's session first: every attempt prints "blocked <label> <exception>" or "ESCAPED <label>".
_ATTEMPT = """
def _attempt(label, fn):
    try:
        fn()
    except BaseException as exc:
        print("blocked", label, type(exc).__name__, getattr(exc, "errno", ""))
    else:
        print("ESCAPED", label)
"""


class Host:
    """What the attacks aim at, made fresh for each attack so that one leak cannot hide or taint another."""

    def __enter__(self) -> "Host":
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        for s in (self.tcp, self.udp):
            s.setblocking(False)
        # Outside the directories a private mount namespace hides, so that only Landlock stands in the way, with
        # permissions open to everyone, so that the uid change alone would not.
        self.dir = Path(tempfile.mkdtemp(prefix="internlm2-redteam-", dir="/run" if os.access("/run", os.W_OK)
                                         else None))
        self.canary, self.secret = self.dir / "canary", self.dir / "secret.key"
        self.canary.mkdir()
        (self.canary / "canary.txt").write_text("canary")
        self.secret.write_text("sk-host-secret")
        for path, mode in ((self.dir, 0o755), (self.canary, 0o777), (self.canary / "canary.txt", 0o666),
                           (self.secret, 0o644)):
            path.chmod(mode)
        self.victim = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        self.fields = {"port": self.tcp.getsockname()[1], "udp_port": self.udp.getsockname()[1],
                       "canary": str(self.canary), "secret": str(self.secret), "victim": self.victim.pid,
                       "env": sorted(environment("/")), "marker": f"internlm2-redteam-{self.victim.pid}"}
        return self

    def leaks(self) -> list[str]:
        """What the host side saw get through."""
        seen = []
        try:
            self.tcp.accept()[0].close()
            seen.append("the loopback listener accepted a connection")
        except BlockingIOError:
            pass
        try:
            self.udp.recvfrom(64)
            seen.append("the loopback UDP socket received a datagram")
        except BlockingIOError:
            pass
        if sorted(os.listdir(self.canary)) != ["canary.txt"] or (self.canary / "canary.txt").read_text() != "canary":
            seen.append("the canary directory was changed")
        if self.victim.poll() is not None:
            seen.append("the sacrificial process was killed")
        seen += [f"{p} was created" for p in ("/tmp", "/dev/shm") if Path(p, self.fields["marker"]).exists()]
        return seen

    def __exit__(self, *exc_info) -> None:
        self.victim.kill()
        self.victim.wait()
        self.tcp.close()
        self.udp.close()
        for p in ("/tmp", "/dev/shm"):
            Path(p, self.fields["marker"]).unlink(missing_ok=True)
        shutil.rmtree(self.dir)


def blocked(results: list[CellResult]) -> str:
    last = results[-1]
    if last.status != "ok":
        return f"{last.status}: {(last.error or '').strip().splitlines()[-1:]}"
    escaped = [line for line in last.stdout.splitlines() if line.startswith("ESCAPED")]
    return "escaped: " + "; ".join(escaped) if escaped else "blocked" if "blocked" in last.stdout else "no attempt"


def _timeout_and_state(results: list[CellResult]) -> str:
    """How the looping cell ended, and whether `x` defined before it survived (`x + 1` is the last cell)."""
    loop, after = results[-2], results[-1]
    if after.status not in ("ok", "error"):
        return f"{loop.status}, then {after.status}"
    return f"{loop.status}, " + ("state kept" if loop.state_kept and after.value == "42" else "restarted")


def _status_then_alive(results: list[CellResult]) -> str:
    alive = results[-1].value == "2" and results[-1].seconds < 2.0
    return ", ".join(r.status for r in results[:-1]) + (", alive" if alive else ", not answering")


def _efbig_then_alive(results: list[CellResult]) -> str:
    """The write must fail inside the cell with EFBIG (errno 27, RLIMIT_FSIZE), and the interpreter answer after."""
    wrote = "EFBIG" if "OSError 27" in results[0].stdout else "written"
    return _status_then_alive(results).replace("ok", wrote, 1)


def _capped(results: list[CellResult]) -> str:
    r = results[0]
    return "capped" if len(r.stdout.encode()) <= 2**20 and r.truncated_bytes + len(r.stdout) >= 2**20 else \
        f"{len(r.stdout)} chars kept, {r.truncated_bytes} dropped"


@dataclass(frozen=True)
class Attack:
    id: str
    name: str
    cells: tuple[str, ...]  # str.format'ed with Host.fields; _attempt is defined beforehand
    expect: str
    guards: tuple[str, ...]  # any one of these stops it
    check: Callable[[list[CellResult]], str] = blocked
    requires: tuple[str, ...] = ()  # run only when all of these are active (destructive attacks)
    policy: dict = field(default_factory=dict)


_LOOP = ("x = 41", "while True:\n    pass", "x + 1")
ATTACKS = (
    Attack("D1", "TCP to a host loopback server", (
        "import socket\n_attempt('tcp', lambda: socket.create_connection(('127.0.0.1', {port}), timeout=1))",),
        "blocked", ("netns", "landlock-net")),
    Attack("D1", "TCP through _socket", (
        "import _socket\ns = _socket.socket()\ns.settimeout(1)\n_attempt('_socket', lambda: s.connect(('127.0.0.1', "
        "{port})))",), "blocked", ("netns", "landlock-net")),
    Attack("D1", "TCP from a child process", (
        "import subprocess, sys\n"
        "child = 'import socket\\ntry:\\n    socket.create_connection((\"127.0.0.1\", {port}), 1)"
        "\\nexcept OSError as e:\\n    print(\"blocked child\", e)\\nelse:\\n    print(\"ESCAPED child\")'\n"
        "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True).stdout)",),
        "blocked", ("netns", "landlock-net")),
    Attack("D1", "UDP to a host loopback socket", (
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "_attempt('udp', lambda: s.sendto(b'leak', ('127.0.0.1', {udp_port})))",), "blocked", ("netns",)),
    # New file, append, through a symlink, hardlink, rename out, /tmp, /dev/shm, /root.
    Attack("D3", "writes outside work/ (8 ways)", (
        "import os\nc = {canary!r}\nopen('inside.txt', 'w').write('x')\n"
        "_attempt('new file', lambda: open(c + '/new.txt', 'w').write('x'))\n"
        "_attempt('append', lambda: open(c + '/canary.txt', 'a').write('x'))\n"
        "os.symlink(c + '/canary.txt', 'link')\n_attempt('via symlink', lambda: open('link', 'a').write('x'))\n"
        "_attempt('hardlink', lambda: os.link(c + '/canary.txt', 'hard'))\n"
        "_attempt('rename out', lambda: os.rename('inside.txt', c + '/moved.txt'))\n"
        "for d in ('/tmp', '/dev/shm', '/root'):\n"
        "    _attempt(d, lambda: open(d + '/{marker}', 'w').write('x'))",), "blocked", ("landlock-fs",)),
    Attack("D3", "a 20 MiB file in work/", (
        "_attempt('20 MiB', lambda: open('big', 'wb').write(b'x' * 20 * 2**20))", "1 + 1"), "EFBIG, alive",
        ("rlimits",), check=_efbig_then_alive),
    Attack("D4", "infinite loop", _LOOP, "timeout, state kept", ("wall-clock",), check=_timeout_and_state,
           policy={"wall_s": 1.0}),
    Attack("D4", "infinite loop ignoring SIGINT", (
        "x = 41", "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass", "x + 1"),
        "timeout, restarted", ("wall-clock",), check=_timeout_and_state, policy={"wall_s": 1.0, "grace_s": 0.5}),
    Attack("D5", "one 100 MB print", ("print('x' * 10**8)",), "capped", ("output-cap", "rlimits"), check=_capped),
    Attack("D5", "endless print loop", ("while True:\n    print('y' * 1000)",), "capped", ("output-cap", "rlimits"),
           check=_capped),
    Attack("D6", "one huge allocation", ("x = bytearray(10**11)", "1 + 1"), "memory, alive", ("rlimits",),
           check=_status_then_alive),
    Attack("D6", "doubling string", ("s = 'a'\nwhile True:\n    s += s", "1 + 1"), "memory, alive", ("rlimits",),
           check=_status_then_alive, policy={"memory_mb": 256}),  # the same limit, reached sooner
    Attack("D7", "signal the parent and a host process", (
        "import os\n_attempt('parent', lambda: os.kill(os.getppid(), 0))\n_attempt('sleep', lambda: os.kill({victim}, "
        "9))",), "blocked", ("uid", "landlock-scope")),
    Attack("D8", "read host secrets", (
        "import os\n_attempt('key file', lambda: open({secret!r}).read())\n"
        "_attempt('parent environ', lambda: open(f'/proc/{{os.getppid()}}/environ').read())\n"
        "_attempt('/root', lambda: os.listdir('/root/.ssh'))\n"
        "print('blocked env' if sorted(os.environ) == {env!r} else 'ESCAPED env', sorted(os.environ))",),
        "blocked", ("landlock-fs", "uid")),
    Attack("D9", "sleep", ("x = 41", "import time\ntime.sleep(100)", "x + 1"), "timeout, state kept",
           ("wall-clock",), check=_timeout_and_state, policy={"wall_s": 1.0}),
    Attack("D10", "read stdin", ("input()", "1 + 1"), "error, alive", ("stdin-null",), check=_status_then_alive),
    Attack("D11", "sys.exit and os._exit", ("import sys\nsys.exit()", "import os\nos._exit(0)", "1 + 1"),
           "restarted, restarted, alive", ("restart",), check=_status_then_alive),
    Attack("D12", "1,000 threads", (
        "import threading, time\nfor _ in range(1000):\n    threading.Thread(target=time.sleep, args=(3,)).start()",
        "1 + 1"), "error, alive", ("nproc",), check=_status_then_alive),
    Attack("D2", "fork bomb", ("import os\nwhile True:\n    os.fork()", "1 + 1"), "error, alive", ("nproc",),
           check=_status_then_alive, requires=("uid", "nproc")),
    Attack("D2", "setsid escape", (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\n    os._exit(0)",), "ok",
        ("uid",), check=lambda results: results[0].status, requires=("uid",)),
)


@dataclass(frozen=True)
class Outcome:
    attack: Attack
    verdict: str  # "PASS" | "FAIL" | "SKIP"
    got: str
    stopped_by: tuple[str, ...]  # the attack's guards that were active


_BASE_POLICY = SandboxPolicy(wall_s=10.0)


def run_attack(attack: Attack, base: SandboxPolicy = _BASE_POLICY) -> Outcome:
    """Run one attack in a fresh session against fresh host targets. An attack whose guards this host cannot apply
    at all is skipped (with the reason); one whose guards the host has but the session lacks fails."""
    supported, missing = host_support()
    if not set(attack.guards) & supported or not set(attack.requires) <= supported:
        lacking = [g for g in (*attack.guards, *attack.requires) if g not in supported]
        return Outcome(attack, "SKIP", "host lacks " + ", ".join(f"{g} ({missing.get(g, 'unsupported')})"
                                                                 for g in lacking), ())
    with Host() as host, PythonSession(replace(base, **attack.policy)) as session:
        stopped_by = tuple(g for g in attack.guards if g in session.guards)
        setup = session.run(_ATTEMPT)
        if setup.status != "ok":
            raise RuntimeError(f"the red-team helper did not load: {setup}")
        results = [session.run(cell.format(**host.fields)) for cell in attack.cells]
        got = attack.check(results)
        session.close()
        leaks = host.leaks() + [f"processes left: {pids}" for pids in [session.live_processes()] if pids]
    if leaks:
        got = f"{got}; " + "; ".join(leaks)
    unapplied = [g for g in attack.guards if g in supported and g not in stopped_by]
    verdict = "PASS" if got == attack.expect and not unapplied else "FAIL"
    return Outcome(attack, verdict, got + "".join(f"; {g} supported but not active" for g in unapplied), stopped_by)


def matrix(outcomes: list[Outcome]) -> str:
    rows = [("id", "attack", "expected", "got", "stopped by", "verdict")]
    rows += [(o.attack.id, o.attack.name[:48], o.attack.expect, o.got[:60], ", ".join(o.stopped_by) or "-", o.verdict)
             for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    supported, missing = host_support()
    print("host supports:", ", ".join(sorted(supported)))
    for guard, why in sorted(missing.items()):
        print(f"host lacks {guard}: {why}")
    start = time.monotonic()
    with PythonSession() as session:
        started = time.monotonic() - start
        cell = min(session.run("1 + 1").seconds for _ in range(20))
    print(f"session start {started * 1000:.0f} ms, trivial cell {cell * 1000:.1f} ms (best of 20)")
    outcomes = [run_attack(a) for a in ATTACKS]
    print(matrix(outcomes))
    return int(any(o.verdict == "FAIL" for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
