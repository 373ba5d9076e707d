"""The browser playground (`--playground`, issue 22): its routes over a scripted engine (absent without the flag,
behind the API key, tools run per session with the result text the model is shown, figures served only when
announced and only as regular files of the work directory, the raw prompt equal to what the chat route sends the
engine), and acceptance 6: the page in a real headless Chromium against a subprocess server whose tiny model was
taught the three-tool conversation of tests/test_agents_openai_sdk.py, where a chat turn streams, each tool call
and its result appear, a screenshot is saved and no request leaves 127.0.0.1.

The browser is Debian's Chromium driven by Playwright (its own browser download cannot work offline). Where it is
absent, the test installs it with apt-get when it runs as root, once; otherwise it is skipped, saying why.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.serve.playground import CONTENT_SECURITY_POLICY, Playground, ToolRequest
from internlm2_jax.serve.protocol import APIError
from serve_testing import running_server
from test_agents_openai_sdk import ANSWER, CALLS, QUESTION, SERVER_FLAGS, taught_model_dir
from test_serve_app import USER, WEATHER, FakeEngine, assert_error, client_for

TEMPLATE = get_chat_template("internlm2_chat")
ROUTES = [("get", "/"), ("get", "/playground.js"), ("get", "/playground.css"), ("get", "/playground/config"),
          ("post", "/playground/sessions"), ("post", "/playground/tools/calculator"),
          ("get", "/playground/sessions/x/figures/fig-001.png"), ("post", "/playground/render")]
PLOT = ("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "plt.plot([1, 4, 9])\nplt.show()\nprint('plotted')")


@pytest.fixture(scope="module")
def engine(trained):
    return FakeEngine(trained, trained.encode("Hi.<|im_end|>"))


@pytest.fixture(scope="module")
def playground(engine, trained):
    with client_for(engine, trained, playground=True) as client:  # as a context: the lifespan closes sessions
        yield client


def test_without_the_flag_no_playground_route_exists(engine, trained):
    client = client_for(engine, trained)
    for method, path in ROUTES:
        assert getattr(client, method)(path).status_code == 404, path


def test_the_page_and_its_files_come_from_the_package_with_a_strict_policy(playground):
    page = playground.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "connect-src 'self'" in CONTENT_SECURITY_POLICY and "default-src 'none'" in CONTENT_SECURITY_POLICY
    for path in ("/playground.js", "/playground.css"):
        assert path in page.text and playground.get(path).status_code == 200
    script = playground.get("/playground.js").text
    assert "innerHTML" not in script  # model output reaches the page as text only
    for text in (page.text, script, playground.get("/playground.css").text):
        assert "://" not in text and "@import" not in text  # every address the page uses is this server's
    config = playground.get("/playground/config").json()
    assert config["model"] == "tiny" and config["max_model_len"] == 512
    assert [t.get("function", {}).get("name", t["type"]) for t in config["tools"]] == \
        ["calculator", "search_docs", "code_interpreter"]


def test_the_playground_routes_need_the_api_key_but_the_page_does_not(engine, trained):
    client = client_for(engine, trained, playground=True, api_key="sesame")
    assert client.get("/").status_code == 200 and client.get("/playground.js").status_code == 200
    assert_error(client.post("/playground/sessions"), 401)
    assert_error(client.post("/playground/tools/calculator", json={"session": "x", "arguments": {}}), 401)
    good = {"Authorization": "Bearer sesame"}
    session = client.post("/playground/sessions", headers=good).json()["session"]
    result = client.post("/playground/tools/calculator", headers=good,
                         json={"session": session, "arguments": {"expression": "2**10"}}).json()
    assert result["status"] == "ok" and result["content"] == "1024"


def test_tools_run_per_session_and_answer_what_the_model_is_shown(playground):
    session = playground.post("/playground/sessions").json()["session"]

    def run(name, arguments, key=session):
        return playground.post(f"/playground/tools/{name}", json={"session": key, "arguments": arguments})

    assert run("calculator", {"expression": "12*34"}).json()["content"] == "408"
    docs = run("search_docs", {"query": "gzip", "k": 1}).json()
    assert docs["status"] == "ok" and json.loads(docs["content"])[0]["title"] == "gzip"
    bad = run("calculator", {"expression": "__import__('os')"}).json()
    assert bad["status"] == "tool_error" and json.loads(bad["content"])["error"]["type"] == "tool_error"
    unknown = run("get_weather", {"city": "Paris"}).json()
    assert unknown["status"] == "unknown_tool" and "declared tools: calculator, search_docs" in unknown["error"]
    assert run("python", {"code": "x = 6 * 7\nprint(x)"}).json()["stdout"] == "42\n"
    assert run("python", {"code": "x + 1"}).json()["value"] == "43"  # the session keeps its variables
    other = playground.post("/playground/sessions").json()["session"]
    assert run("python", {"code": "x"}, other).json()["status"] == "error"  # sessions are apart
    assert_error(run("calculator", {"expression": "1"}, "no-such-session"), 404, "session")


def test_figures_are_served_when_announced_and_never_through_a_link(playground):
    session = playground.post("/playground/sessions").json()["session"]
    result = playground.post("/playground/tools/python", json={"session": session, "arguments": {"code": PLOT}})
    body = result.json()
    assert body["status"] == "ok" and body["stdout"] == "plotted\n", body
    [url] = body["figures"]
    assert url == f"/playground/sessions/{session}/figures/fig-001.png" and "![fig-001](fig-001.png)" in body["content"]
    figure = playground.get(url)
    assert figure.status_code == 200 and figure.headers["content-type"] == "image/png"
    assert figure.content.startswith(b"\x89PNG\r\n\x1a\n") and len(figure.content) > 1000
    # Not announced (even if it exists), or not one plain name: not served.
    playground.post("/playground/tools/python", json={"session": session, "arguments": {
        "code": "open('notes.png', 'wb').write(b'x')"}})
    for name in ("notes.png", "..", "fig-001.png.bak", "%2e%2e%2fetc%2fpasswd"):
        assert playground.get(f"/playground/sessions/{session}/figures/{name}").status_code == 404, name
    # The sandboxed code swaps the announced figure for a link to a file outside its work directory.
    swap = "import os\nos.remove('fig-001.png')\nos.symlink('/etc/hostname', 'fig-001.png')"
    assert playground.post("/playground/tools/python", json={"session": session, "arguments": {"code": swap}}
                           ).json()["status"] == "ok"
    assert_error(playground.get(url), 404, "name")
    assert_error(playground.get("/playground/sessions/nobody/figures/fig-001.png"), 404, "session")


def test_the_raw_prompt_is_what_the_chat_route_sends_the_engine(playground, engine, trained):
    tools = [{"type": "code_interpreter"}, WEATHER]  # all the page's tools would pass the fake engine's 512 tokens
    rendered = playground.post("/playground/render", json={"messages": USER, "tools": tools}).json()
    text = "".join(segment["text"] for segment in rendered["segments"])
    assert text.startswith("<s><|im_start|>system name=<|interpreter|>\n")
    assert "<|im_start|>system name=<|plugin|>\n" in text and text.endswith("<|im_start|>assistant\n")
    assert {s["text"] for s in rendered["segments"] if s["special"]} >= {"<s>", "<|im_start|>assistant\n"}
    answer = playground.post("/v1/chat/completions", json={"messages": USER, "tools": tools, "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    prompt = engine.requests[-1].prompt_ids
    assert rendered["tokens"] == len(prompt) and trained.decode(prompt, skip_special_tokens=False) == text
    assert_error(playground.post("/playground/render", json={"messages": [{"role": "wizard", "content": "x"}]}),
                 400, "messages[0].role")


def test_old_sessions_are_closed_and_the_rest_at_shutdown(trained):
    playground = Playground(TEMPLATE, trained, "tiny", 512, max_sessions=2)
    app = FastAPI(lifespan=playground.lifespan)
    playground.add_routes(app, [])
    with TestClient(app) as client:
        first, second, third = (client.post("/playground/sessions").json()["session"] for _ in range(3))
        with pytest.raises(APIError, match="no playground session"):  # the oldest went when the third came
            playground.run_tool("python", ToolRequest(session=first, arguments={"code": "print(1)"}))
        assert playground.run_tool("python", ToolRequest(session=third, arguments={"code": "print(1)"}))[
            "stdout"] == "1\n"
        interpreter = playground._session(third).tools.interpreter
        work = interpreter.work_dir
        assert work.is_dir()
    assert interpreter.work_dir is None and not work.exists()  # closed with the app
    with pytest.raises(APIError, match="no playground session"):
        playground.run_tool("python", ToolRequest(session=third, arguments={"code": "print(1)"}))
    # A call that found its session before it was closed (it waited for the session's lock) starts nothing.
    key = playground.new_session()["session"]
    playground._session(key).close()
    with pytest.raises(APIError, match="closed for a newer one"):
        playground.run_tool("python", ToolRequest(session=key, arguments={"code": "print(1)"}))
    assert playground._session(key).tools.interpreter.work_dir is None
    assert_error(client_for(FakeEngine(trained), trained, playground=True).post(
        "/playground/tools/python", json={"session": second, "arguments": {}}), 404, "session")


def test_the_flag_on_a_public_host_needs_a_key(tmp_path, capsys):
    from internlm2_jax.serve.__main__ import main

    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path), "--playground", "--host", "0.0.0.0"])
    assert "--playground runs code for whoever reaches the page" in capsys.readouterr().err


# ---- acceptance 6: the page in a real browser --------------------------------------------------------------------


def chromium_path() -> str:
    """Debian's Chromium, installed here with apt-get if absent and possible; else the test is skipped."""
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                      "(requirements-test.txt)")
    path = shutil.which("chromium")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        reason = "no chromium, and apt-get cannot install it here (not root, or no apt-get)"
        print(reason, file=sys.stderr)
        pytest.skip(reason)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "chromium", "chromium-driver"]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:  # a stale package list: refresh it once and try again
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=300)
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    path = shutil.which("chromium")
    if not path:
        reason = f"apt-get could not install chromium: {(done.stdout + done.stderr)[-800:]}"
        print(reason, file=sys.stderr)
        pytest.skip(reason)
    return path


# The probe's flags (platform notes): nothing in the background reaches for the network, and every host name but
# 127.0.0.1 resolves to nothing, so a request that escaped the page's policy could not leave the machine either.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
# Records what the last assistant turn showed after each change of the page: a streamed answer is seen growing.
RECORD_ANSWER = """
window.__answers = [];
new MutationObserver(() => {
  const shown = document.querySelectorAll(".turn.assistant .content");
  if (shown.length) window.__answers.push(shown[shown.length - 1].textContent);
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_the_page_in_headless_chromium(tmp_path_factory, tmp_path, trained):
    started = time.monotonic()
    browser_path = chromium_path()
    from playwright.sync_api import sync_playwright

    model_dir = taught_model_dir(tmp_path_factory.getbasetemp(), trained)
    with running_server(model_dir, tmp_path / "server.log", *SERVER_FLAGS, "--playground") as (base, _):
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            requests = []
            context.on("request", lambda request: requests.append(request.url))
            page = context.new_page()
            page.add_init_script(RECORD_ANSWER)
            page.goto(base + "/")
            page.wait_for_selector("#tools input[data-tool=python]")
            page.fill("#input", QUESTION)
            page.click("#send")
            page.wait_for_selector(".turn.assistant .finish:text('finish: stop')", timeout=240_000)
            assert page.locator(".turn.error").count() == 0, page.locator(".turn.error").all_inner_texts()

            names = page.locator(".tool-call .tool-name").all_inner_texts()
            assert names == [f"call {name}" for name, _ in CALLS]
            arguments = page.locator(".tool-call .tool-arguments").all_inner_texts()
            assert json.loads(arguments[0]) == CALLS[0][1] and arguments[2] == CALLS[2][1]["code"]
            statuses = page.locator(".tool-result .tool-status").all_inner_texts()
            assert statuses == ["result: ok"] * 3
            assert page.locator(".tool-result .tool-content").first.inner_text() == "408"
            assert page.locator(".tool-result .tool-stdout").inner_text().strip() == "408"

            final = page.locator(".turn.assistant").last
            assert final.locator(".content").inner_text() == ANSWER
            assert int(final.get_attribute("data-chunks")) > 1  # several deltas of server-sent events
            shown = [text for text in page.evaluate("window.__answers") if text]
            growing = list(dict.fromkeys(text for text in shown if ANSWER.startswith(text)))
            assert len(growing) >= 2 and growing[-1] == ANSWER, shown  # the answer grew in place

            page.click("#show-prompt")
            page.wait_for_selector("#prompt-view .special")
            prompt = page.inner_text("#prompt-view")
            assert "<|im_start|>system name=<|interpreter|>" in prompt and "<|action_start|>" in prompt
            assert f"<|im_start|>assistant\n{ANSWER}" in prompt

            screenshot = tmp_path / "playground.png"
            page.screenshot(path=str(screenshot), full_page=True)
            browser.close()
    width, height = png_size(screenshot)
    assert width >= 1280 and height >= 600 and screenshot.stat().st_size > 20_000
    outside = [url for url in requests if not url.startswith(base + "/")]
    assert requests and not outside, outside
    print(f"playground browser test: {time.monotonic() - started:.1f} s, {len(requests)} requests, "
          f"screenshot {screenshot}")
