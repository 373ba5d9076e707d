"""The code interpreter as a tool: one stateful, sandboxed `PythonSession` per agent run (agents.md §2.6), opened at
the first call so that an agent that never runs code never starts a process. It answers the `<|interpreter|>` kind
of call (`ToolExecutor(interpreter=PythonTool())`), not a plugin."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from internlm2_jax.agents.protocol import INTERPRETER_TOOL_NAME, ToolResult
from internlm2_jax.sandbox import CellResult, PythonSession, SandboxError, SandboxPolicy


class PythonTool:
    """`tool(code) -> ToolResult` in one session: variables and files persist from call to call until `reset` or
    `close` (or a restart, which the result reports)."""

    name = INTERPRETER_TOOL_NAME
    # The arguments of an interpreter call (`protocol.Call.arguments`), and of the OpenAI-style "python" function.
    parameters: Mapping[str, Any] = {
        "type": "object", "properties": {"code": {"type": "string", "description": "Python code to run"}},
        "required": ["code"], "additionalProperties": False}

    def __init__(self, policy: SandboxPolicy | None = None, *, files: Mapping[str, bytes] | None = None,
                 timeout_s: float | None = None):
        self.policy = policy or SandboxPolicy()
        self.files = dict(files or {})
        self.timeout_s = timeout_s  # per call; None: the policy's wall_s
        self._session: PythonSession | None = None

    @property
    def guards(self) -> frozenset[str]:
        """The guards of the running session (empty before the first call)."""
        return self._session.guards if self._session is not None else frozenset()

    @property
    def work_dir(self) -> Path | None:
        """The running session's work directory, where the code's files and figures are (None before the first
        call). The sandboxed code owns it: open what is in it as untrusted (no links followed)."""
        return None if self._session is None else Path(self._session.work)

    def __call__(self, code: str) -> ToolResult:
        try:
            if self._session is None:
                self._session = PythonSession(self.policy, files=self.files)
            cell = self._session.run(code, timeout_s=self.timeout_s)
        except SandboxError as exc:
            return ToolResult(status="sandbox_error", error=str(exc))
        return to_result(cell)

    def reset(self) -> None:
        """A fresh namespace (files stay), as between problems of an evaluation."""
        if self._session is not None:
            self._session.reset()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> PythonTool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def to_result(cell: CellResult) -> ToolResult:
    """A cell's result as the protocol carries it; output beyond the capture limit is said to be missing rather than
    silently absent."""
    stderr = cell.stderr
    if cell.truncated_bytes:
        stderr += f"\n[{cell.truncated_bytes} more bytes of output were not kept]\n"
    return ToolResult(value=cell.value, stdout=cell.stdout, stderr=stderr, error=cell.error, status=cell.status,
                      images=cell.images)
