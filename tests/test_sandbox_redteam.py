"""The sandbox red team (docs/agents.md §4.4): every attack of internlm2_jax.agents.redteam ends with its expected
status; an attack is skipped, with the reason printed, only when this host cannot apply any guard that stops it;
a guard the host supports but a session lacks fails the test (a new machine must not silently degrade)."""

import os
import time

import pytest

from internlm2_jax.agents.redteam import ATTACKS, matrix, run_attack
from internlm2_jax.sandbox import PythonSession, host_support
from internlm2_jax.sandbox.guards import landlock_abi


@pytest.mark.parametrize("attack", [pytest.param(a, id=f"{a.id}-{a.name[:30]}") for a in ATTACKS])
def test_attack_gets_its_expected_outcome(attack):
    outcome = run_attack(attack)
    print(matrix([outcome]))
    if outcome.verdict == "SKIP":
        pytest.skip(outcome.got)
    assert outcome.verdict == "PASS", outcome.got


def _rss_bytes() -> int:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


def test_d5_huge_output_does_not_grow_the_parent():
    before = _rss_bytes()
    for attack in [a for a in ATTACKS if a.id == "D5"]:
        assert run_attack(attack).verdict == "PASS"
    assert _rss_bytes() - before < 50 * 2**20


def test_d13_two_sessions_cannot_see_each_other():
    with PythonSession() as a, PythonSession() as b:
        a.run("secret = 'a'\nopen('mine.txt', 'w').write('a')")
        assert "NameError" in b.run("secret").error
        stolen = b.run(f"open({os.path.join(a.work, 'mine.txt')!r}).read()")
        assert stolen.status == "error" and ("PermissionError" in stolen.error or "FileNotFoundError" in stolen.error)
        if a.uid is not None:
            assert a.uid != b.uid


def test_d15_every_guard_the_host_supports_is_active():
    supported, missing = host_support()
    for guard, why in sorted(missing.items()):
        print(f"host lacks {guard}: {why}")
    with PythonSession() as session:
        assert supported <= session.guards, f"supported but not active: {supported - session.guards}"
    # Independent of the probe, so that a probe that wrongly reports "unsupported" cannot excuse a missing guard.
    abi, why = landlock_abi()
    expected = {guard for guard, since in (("landlock-fs", 1), ("landlock-net", 4), ("landlock-scope", 6))
                if abi >= since}
    if os.geteuid() == 0:
        expected |= {"netns", "mountns", "uid", "nproc"}  # root: CI and the development machine
    print(f"Landlock ABI {abi} {why}; expecting {sorted(expected)}")
    assert expected <= session.guards, {g: missing.get(g) for g in expected - session.guards}


def test_d16_latency():
    starts, cells = [], []
    for _ in range(3):
        start = time.monotonic()
        with PythonSession() as session:
            starts.append(time.monotonic() - start)
            cells.append(min(session.run("1 + 1").seconds for _ in range(5)))
    print(f"session start {[f'{s * 1000:.0f} ms' for s in starts]}, trivial cell {min(cells) * 1000:.2f} ms")
    # The design targets (start p95 < 1 s, cell < 50 ms), with room for a shared 2-core machine.
    assert sorted(starts)[1] < 1.0 and min(cells) < 0.05
