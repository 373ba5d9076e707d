"""`python -m internlm2_jax.serve` in a subprocess, driven by clients we did not write: the `openai` SDK (chat,
streaming chat, completions with echo/logprobs, a tool-call round trip) and a 64-client load test (nothing lost, bad
requests answered 4xx, resident memory after the load within 10% of its value after warm-up). The chat and echo
tests also run against a second server on a mesh (`--cpu-devices 4 --mesh tensor=4`), which must answer as one
device does.

The tool round trip needs a model that calls the tool: the fixture teaches the tiny model one conversation (a user
question with a tool list -> a plugin call) by overfitting it for a few hundred steps, in the same template the
server renders.
"""

import json
import threading
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import optax
import pytest
from flax import nnx

from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.config import preset
from internlm2_jax.convert import save_pretrained
from internlm2_jax.decode.scoring import score_tokens
from internlm2_jax.artifacts import load_for_decoding
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.serve.protocol import ChatMessage, Tool, template_messages
from serve_testing import running_server

KEY = "test-key"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {"type": "plugin", "name": "get_weather", "parameters": {"city": "Paris"}}


def memorize_tool_call(model, tokenizer) -> None:
    """Overfits `model` on the server's rendering of QUESTION + TOOLS answered by CALL (loss on the answer only)."""
    messages = template_messages([ChatMessage(**m) for m in QUESTION], [Tool(**t) for t in TOOLS])
    memorize(model, tokenizer, messages + [{"role": "assistant", "content": "", "tool_call": CALL}])


def memorize(model, tokenizer, messages, steps: int = 300) -> None:
    """Overfits `model` on template `messages` (loss on the assistant turns only) until greedy decoding repeats
    them."""
    ids, mask = get_chat_template("internlm2_chat").encode(messages, tokenizer)
    x, y, m = (jnp.asarray([a]) for a in (ids[:-1], ids[1:], mask[1:]))
    graphdef, params = nnx.split(model, nnx.Param)
    rest = nnx.state(model, nnx.Not(nnx.Param))
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params, rest)(x)
            lp = jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]
            return -(lp * m).sum() / m.sum()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
    assert float(loss) < 1e-2, float(loss)
    nnx.update(model, params)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("serve")
    model = InternLM2ForCausalLM(preset("tiny", vocab_size=trained.vocab_size, max_position_embeddings=512),
                                 rngs=nnx.Rngs(3))
    memorize_tool_call(model, trained)
    save_pretrained(model, root / "model", layout="internlm2", tokenizer=trained)
    return root / "model"


@pytest.fixture(scope="module")
def server(model_dir):
    yield from serve(model_dir, "one-device", "--max-model-len", "256", "--max-running", "16", "--max-waiting", "24",
                     "--prefill-chunk", "64")


@pytest.fixture(scope="module")
def mesh_server(model_dir):
    """The same model served on 4 CPU devices, tensor-parallel (its 2 kv heads repeated to 4); limits small enough
    for the chat and echo tests, so that its warm-up compiles few programs."""
    yield from serve(model_dir, "mesh", "--max-model-len", "64", "--max-running", "2", "--prefill-chunk", "16",
                     "--cpu-devices", "4", "--mesh", "tensor=4")


def serve(model_dir, name, *flags):
    """Runs the server on `model_dir` with `flags` until the module's tests are done; yields where it is."""
    log_path = model_dir.parent / f"{name}.log"
    with running_server(model_dir, log_path, "--api-key", KEY, "--kv-budget-tokens", "4096", "--page-size", "16",
                        "--log-level", "warning", *flags) as (base, proc):
        yield {"base": base, "pid": proc.pid, "dir": model_dir, "log": log_path, "name": name}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(model_dir):
    return load_for_decoding(model_dir)


@pytest.fixture(params=["one-device", "mesh"])
def any_server(request):
    """Each server in turn: on the mesh it must answer as on one device (the reference is one device's)."""
    return request.getfixturevalue("server" if request.param == "one-device" else "mesh_server")


def test_models_auth_chat_and_streaming(any_server, reference):
    from internlm2_jax.decode import generate

    server = any_server
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    where = "on mesh {'data': 1, 'fsdp': 1, 'tensor': 4, 'sequence': 1}" if server["name"] == "mesh" else \
        "on one device"
    assert where in server["log"].read_text()  # the parameter memory line printed at start-up
    (model_id,) = [m.id for m in client.models.list().data]
    assert model_id == "model"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0).models.list()
    messages = [{"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=2)
    expected = generate(*reference, [messages], max_new_tokens=12)[0]
    assert chat.choices[0].message.content == expected.text.strip() or chat.choices[0].message.content == \
        expected.text
    assert chat.usage.completion_tokens == len(expected.tokens)
    assert len(chat.choices[0].logprobs.content) == len(expected.tokens)
    np.testing.assert_allclose([t.logprob for t in chat.choices[0].logprobs.content], expected.logprobs, atol=1e-4)
    stream = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_completions_echo_logprobs_in_the_lm_eval_shape(any_server, reference):
    client = openai.OpenAI(base_url=any_server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    model, tokenizer = reference
    ids = tokenizer.encode("def add(a, b):\n    return a + b", add_bos=True)
    out = client.completions.create(model="model", prompt=[ids], echo=True, logprobs=1, max_tokens=1,
                                    temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    (chosen, _, _), = score_tokens(model, [ids])
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], chosen, atol=1e-4)
    assert all(len(top) >= 1 for top in lp.top_logprobs[1:])
    plain = client.completions.create(model="model", prompt=["def add(a, b):", "import os"], max_tokens=5,
                                      temperature=0)
    assert [c.index for c in plain.choices] == [0, 1] and plain.usage.completion_tokens == 10 or \
        any(c.finish_reason == "stop" for c in plain.choices)


def test_bad_placement_flags_are_refused(model_dir, capsys):
    from internlm2_jax.serve.__main__ import main

    assert main(["--checkpoint", str(model_dir), "--mesh", "tensr=4"]) == 1
    assert "error: mesh 'tensr=4': 'tensr=4' is not AXIS=SIZE" in capsys.readouterr().err
    assert main(["--checkpoint", str(model_dir), "--mesh", "tensor=16"]) == 1
    assert "needs 16 devices, but 8 are available" in capsys.readouterr().err


def test_tool_call_round_trip(client):
    first = client.chat.completions.create(model="model", messages=QUESTION, tools=TOOLS, max_tokens=40,
                                           temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    history = QUESTION + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 18})}]
    second = client.chat.completions.create(model="model", messages=history, tools=TOOLS, max_tokens=8,
                                            temperature=0)
    assert second.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    streamed = client.chat.completions.create(model="model", messages=QUESTION, tools=TOOLS, max_tokens=40,
                                              temperature=0, stream=True)
    calls = [tc for chunk in streamed if chunk.choices for tc in (chunk.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"


def test_tool_choice_on_the_model_that_learnt_the_call(client):
    """E3/E4 on a model trained to call: tool_choice="none" leaves no call (and no call text) in its answer; naming
    the tool pre-fills the call's start as the template tokenizes it, and the model completes the call it learnt."""
    none = client.chat.completions.create(model="model", messages=QUESTION, tools=TOOLS, tool_choice="none",
                                          max_tokens=24, temperature=0)
    message = none.choices[0].message
    assert not message.tool_calls and none.choices[0].finish_reason in {"stop", "length"}
    assert "<|" not in (message.content or "") and '"name"' not in (message.content or "")
    named = client.chat.completions.create(model="model", messages=QUESTION, tools=TOOLS, max_tokens=40,
                                           temperature=0, tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert named.choices[0].finish_reason == "tool_calls"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def load_round(base: str, requests: list[dict]) -> list[tuple[int, dict]]:
    """64 client threads share `requests`; a 429 is retried after a pause, anything else is the answer."""
    answers: list = [None] * len(requests)
    todo = list(range(len(requests)))
    lock = threading.Lock()

    def worker():
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                while True:
                    r = http.post("/v1/chat/completions", json=requests[i])
                    if r.status_code != 429:
                        answers[i] = (r.status_code, r.json())
                        break
                    time.sleep(0.05)

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_load_64_clients_nothing_lost_and_memory_flat(server):
    rng = np.random.RandomState(0)
    words = "the a cat dog runs jumps over under big small red blue".split()
    good = [{"model": "model", "temperature": float(rng.choice([0.0, 0.8])), "seed": i,
             "max_tokens": int(rng.randint(1, 24)),
             "messages": [{"role": "user", "content": " ".join(rng.choice(words, rng.randint(1, 30)))}]}
            for i in range(96)]
    bad = [{"model": "model", "temperature": -1, "messages": QUESTION},
           {"model": "model", "max_tokens": 400, "messages": QUESTION},
           {"model": "model", "messages": [{"role": "wizard", "content": "x"}]},
           {"model": "model", "messages": "not a list"}] * 4
    requests = good + bad
    load_round(server["base"], requests)  # warm-up: compiles the shapes the load uses
    warm = rss_kb(server["pid"])
    answers = load_round(server["base"], requests)
    after = rss_kb(server["pid"])
    for request, (status, body) in zip(good, answers[:len(good)], strict=True):
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] in {"stop", "length", "tool_calls"}
        assert body["usage"]["completion_tokens"] >= 1
        assert choice["finish_reason"] != "length" or body["usage"]["completion_tokens"] == request["max_tokens"]
    for status, body in answers[len(good):]:
        assert 400 <= status < 500 and body["error"]["message"], body
    health = httpx.get(server["base"] + "/health").json()
    assert health["running"] == 0 and health["kv_pages_available"] == health["kv_pages_total"], health
    assert after <= warm * 1.10, f"RSS grew from {warm} kB after warm-up to {after} kB after the load"
