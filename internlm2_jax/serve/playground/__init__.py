"""The browser playground of `python -m internlm2_jax.serve ... --playground`: one page at `/` (plain HTML, JS and
CSS from this package: no build step, nothing fetched from anywhere but this server) that chats through
`/v1/chat/completions` with streaming, shows each tool call, runs it here and shows the result, the interpreter's
output and figures, and the raw InternLM2 prompt on demand.

None of these routes exists without the flag. The page's own files are public; the rest sits behind the API key like
/v1, because it runs code:

- `GET /playground/config`: the model, its context length and the tools the page declares;
- `POST /playground/sessions`: a session of its own for a browser tab: a `ToolExecutor` with the calculator,
  search_docs and a sandboxed Python session (`PythonTool`, started at its first call); at most MAX_SESSIONS live,
  the oldest is closed when a new one would pass that;
- `POST /playground/tools/{name}`: runs one call in a session; answers the text the model is to be shown
  (`content`, for the `tool` message, as `protocol.result_turn` writes it) and its parts for display;
- `GET /playground/sessions/{session}/figures/{name}`: a PNG that the session's interpreter announced, read from its
  work directory;
- `POST /playground/render`: messages and tools as the prompt the chat route renders, segment by segment (control
  tokens marked), with its length in tokens.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import secrets
import stat
import threading
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.params import Depends
from fastapi.responses import Response
from pydantic import BaseModel, Field

from internlm2_jax.agents.protocol import INTERPRETER_TOOL_NAME, Call, result_turn
from internlm2_jax.agents.tools import PythonTool, ToolExecutor, search_docs
from internlm2_jax.agents.tools.calculator import calculator
from internlm2_jax.serve.protocol import APIError, ChatMessage, Tool, template_messages

MAX_SESSIONS = 8
MAX_FIGURE_BYTES = 16 * 2**20  # the sandbox's own file size limit (SandboxPolicy.file_mb)
# The page may reach this server and nothing else (its scripts and styles are files, never inline), so neither a
# mistake in the page nor model output that slips into it can load anything from elsewhere.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
          "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
          "/playground.css": ("playground.css", "text/css; charset=utf-8")}
# The sandbox names figures fig-001.png; a name is one path component, so it cannot leave the work directory.
_FIGURE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}\.png")


def playground_tools() -> ToolExecutor:
    """A session's tools; their order is the order the model is shown them."""
    return ToolExecutor([calculator, search_docs], interpreter=PythonTool())


@dataclasses.dataclass
class _Session:
    tools: ToolExecutor
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # one call at a time per session
    figures: set[str] = dataclasses.field(default_factory=set)  # names its interpreter announced
    closed: bool = False  # set under `lock`: a call that waited for the lock must not start a new interpreter

    def close(self) -> None:
        with self.lock:  # a cell still running finishes (or times out) first
            self.closed = True
            self.tools.close()


class ToolRequest(BaseModel):
    session: str
    arguments: dict[str, Any]


class RenderRequest(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None


class Playground:
    """The playground's state (its browser sessions) and route handlers, over the server's template and tokenizer."""

    def __init__(self, chat_template, tokenizer, model_name: str, max_model_len: int,
                 max_sessions: int = MAX_SESSIONS):
        self.chat_template, self.tokenizer = chat_template, tokenizer
        self.model_name, self.max_model_len, self.max_sessions = model_name, max_model_len, max_sessions
        with playground_tools() as tools:  # nothing starts: the interpreter opens at its first call
            self.tools = [*tools.openai_tools(), {"type": "code_interpreter"}]
        self.files = {path: (resources.files(__name__).joinpath(name).read_bytes(), media_type)
                      for path, (name, media_type) in _FILES.items()}
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add_routes(self, app: FastAPI, dependencies: list[Depends]) -> None:
        for path, (content, media_type) in self.files.items():
            app.get(path, include_in_schema=False)(self._file_route(content, media_type))
        # Plain `def` handlers: FastAPI runs them on its thread pool, so a cell running for seconds blocks no stream.
        router = APIRouter(prefix="/playground", dependencies=dependencies)
        router.get("/config")(self.config)
        router.post("/sessions")(self.new_session)
        router.post("/tools/{name}")(self.run_tool)
        router.get("/sessions/{session}/figures/{name}")(self.figure)
        router.post("/render")(self.render)
        app.include_router(router)

    @staticmethod
    def _file_route(content: bytes, media_type: str):
        async def serve_file() -> Response:
            return Response(content, media_type=media_type,
                            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-store"})

        return serve_file

    def config(self) -> dict[str, Any]:
        return {"model": self.model_name, "max_model_len": self.max_model_len, "tools": self.tools}

    def new_session(self) -> dict[str, str]:
        key = secrets.token_urlsafe(18)
        with self._lock:
            self._sessions[key] = _Session(playground_tools())
            evicted = [self._sessions.popitem(last=False)[1] for _ in range(len(self._sessions) - self.max_sessions)]
        for session in evicted:
            session.close()
        return {"session": key}

    def _session(self, key: str) -> _Session:
        with self._lock:
            session = self._sessions.get(key)
        if session is None:
            raise APIError(404, f"no playground session {key!r} (it ended, or the server restarted): reload the page",
                           param="session", code="session_not_found")
        return session

    def run_tool(self, name: str, body: ToolRequest) -> dict[str, Any]:
        session = self._session(body.session)
        kind = "interpreter" if name == INTERPRETER_TOOL_NAME else "plugin"
        call = Call(kind, name, body.arguments, json.dumps(body.arguments, ensure_ascii=False))
        with session.lock:
            if session.closed:  # evicted while this call waited
                raise APIError(404, "this playground session was closed for a newer one: reload the page",
                               param="session", code="session_not_found")
            result = session.tools(call)  # never raises for what the tool does: failures are results
            session.figures.update(result.images)
        # A plugin's value is in `content` already, as JSON; the interpreter's is the repr of its last expression.
        return {"status": result.status, "content": result_turn(call, result)["content"],
                "stdout": result.stdout, "stderr": result.stderr, "error": result.error,
                "value": result.value if kind == "interpreter" else None,
                "figures": [f"/playground/sessions/{body.session}/figures/{image}" for image in result.images]}

    def figure(self, session: str, name: str) -> Response:
        found = self._session(session)
        work = found.tools.interpreter.work_dir
        if name not in found.figures or not _FIGURE_NAME.fullmatch(name) or work is None:
            raise APIError(404, f"no figure {name!r} in this session", param="name")
        # The sandboxed code owns the work directory and could swap the file for a link or a FIFO: open without
        # following a link (the name has no other component to follow) and without blocking, then serve only a
        # regular file.
        try:
            fd = os.open(work / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            raise APIError(404, f"figure {name!r}: {e.strerror}", param="name") from None
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FIGURE_BYTES:
                raise APIError(404, f"figure {name!r} is not a regular file of at most {MAX_FIGURE_BYTES} bytes",
                               param="name")
            content = file.read(MAX_FIGURE_BYTES)
        return Response(content, media_type="image/png", headers={"X-Content-Type-Options": "nosniff",
                                                                  "Cache-Control": "no-store"})

    def render(self, body: RenderRequest) -> dict[str, Any]:
        """The prompt `/v1/chat/completions` would render for these messages and tools (generation prompt
        included)."""
        messages = template_messages(body.messages, body.tools)
        try:
            segments = self.chat_template.segments(messages, add_generation_prompt=True)
            ids, _ = self.chat_template.encode(messages, self.tokenizer, add_generation_prompt=True)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None
        return {"segments": [{"text": s.text, "special": s.special} for s in segments], "tokens": len(ids)}

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI):
        try:
            yield
        finally:
            self.close()  # no sandboxed interpreter outlives the server
