// The playground page: an agent loop in the browser. Each assistant turn streams from /v1/chat/completions; a tool
// call is shown, run by the server for this page (/playground/tools/NAME, in this tab's session) and answered with
// a `tool` message naming its call id, until the model answers in words. Model output and tool results are untrusted
// text: they only ever reach the page through textContent, never as HTML.
"use strict";

const MAX_ROUNDS = 8; // model turns per user message: a model that keeps calling tools stops here

const state = { config: null, session: null, messages: [], busy: false };
const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = "Bearer " + key;
  return result;
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
  return data;
}

function setStatus(text) { $("status").textContent = text; }

function toolName(tool) { return tool.type === "code_interpreter" ? "python" : tool.function.name; }

async function connect() {
  try {
    state.config = await api("/playground/config");
    state.session = (await api("/playground/sessions", {})).session;
  } catch (error) {
    setStatus("not connected: " + error.message);
    return;
  }
  const box = $("tools");
  box.replaceChildren(element("legend", "", "Tools (run here, sandboxed)"));
  for (const tool of state.config.tools) {
    const label = element("label");
    const check = element("input");
    check.type = "checkbox";
    check.checked = true;
    check.dataset.tool = toolName(tool);
    label.append(check, " " + toolName(tool));
    box.append(label);
  }
  setStatus(`model ${state.config.model}, context ${state.config.max_model_len} tokens`);
}

function selectedTools() {
  const on = new Set([...document.querySelectorAll("#tools input:checked")].map((c) => c.dataset.tool));
  return state.config.tools.filter((tool) => on.has(toolName(tool)));
}

function requestMessages() {
  const system = $("system").value.trim();
  return system ? [{ role: "system", content: system }, ...state.messages] : [...state.messages];
}

function addTurn(role, text) {
  const turn = element("div", "turn " + role);
  turn.append(element("div", "role", role), element("div", "content", text));
  $("log").append(turn);
  turn.scrollIntoView({ block: "end" });
  return turn;
}

// One assistant turn, streamed: the content grows in place as server-sent events arrive; a call comes whole.
async function assistantTurn() {
  const body = {
    model: state.config.model, messages: requestMessages(), stream: true,
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  const tools = selectedTools();
  if (tools.length) body.tools = tools;
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) {
    const data = await response.json();
    throw new Error(data.error ? data.error.message : response.statusText);
  }
  const turn = addTurn("assistant", "");
  const content = turn.querySelector(".content");
  const message = { role: "assistant", content: "" };
  let finish = null;
  let chunks = 0;
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!frame.startsWith("data: ") || frame === "data: [DONE]") continue;
      const chunk = JSON.parse(frame.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue; // the usage chunk
      const delta = choice.delta;
      if (delta.content) {
        message.content += delta.content;
        content.textContent = message.content;
        turn.dataset.chunks = String(++chunks);
      }
      if (delta.tool_calls) {
        message.tool_calls = delta.tool_calls.map(({ index, ...call }) => call);
      }
      if (delta.tool_call_error) {
        const error = delta.tool_call_error;
        turn.append(element("pre", "call-error", `the model's call could not be taken (${error.type}): ${error.message}\n${error.raw}`));
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  turn.append(element("div", "finish", "finish: " + finish));
  if (!message.content) message.content = null;
  return { turn, message };
}

function showCall(turn, call) {
  const box = element("div", "tool-call");
  const name = call.function.name;
  box.append(element("div", "tool-name", "call " + name));
  let text;
  try {
    const args = JSON.parse(call.function.arguments);
    text = name === "python" && typeof args.code === "string" ? args.code : JSON.stringify(args, null, 2);
  } catch (error) {
    text = call.function.arguments; // not JSON: shown as the model wrote it
  }
  box.append(element("pre", "tool-arguments", text));
  turn.append(box);
}

async function showFigure(box, url) {
  const response = await fetch(url, { headers: headers() }); // a blob, so that the API key can go with it
  if (!response.ok) return;
  const image = element("img");
  image.alt = url.split("/").pop();
  image.src = URL.createObjectURL(await response.blob());
  box.append(image);
}

async function runCall(turn, call) {
  const result = await api("/playground/tools/" + encodeURIComponent(call.function.name),
    { session: state.session, arguments: JSON.parse(call.function.arguments) });
  const box = element("div", "tool-result" + (result.status === "ok" ? "" : " failed"));
  box.append(element("div", "tool-status", "result: " + result.status));
  if (call.function.name === "python") {
    for (const part of ["stdout", "stderr", "value", "error"]) {
      if (result[part]) box.append(element("pre", "tool-" + part, result[part]));
    }
    for (const url of result.figures) await showFigure(box, url);
  } else {
    box.append(element("pre", "tool-content", result.content));
  }
  turn.append(box);
  return result;
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  addTurn("user", text);
  for (let round = 0; round < MAX_ROUNDS; round++) {
    const { turn, message } = await assistantTurn();
    state.messages.push(message);
    if (!message.tool_calls) return;
    const call = message.tool_calls[0]; // one call per turn: the protocol has no parallel calls
    showCall(turn, call);
    const result = await runCall(turn, call);
    state.messages.push({ role: "tool", tool_call_id: call.id, content: result.content });
  }
  addTurn("error", `stopped after ${MAX_ROUNDS} model turns without an answer`);
}

async function showPrompt() {
  const panel = $("prompt-panel");
  if (!state.messages.length) {
    panel.hidden = false;
    $("prompt-view").textContent = "(no messages yet)";
    return;
  }
  const rendered = await api("/playground/render", { messages: requestMessages(), tools: selectedTools() });
  const view = $("prompt-view");
  view.replaceChildren(...rendered.segments.map((s) => element("span", s.special ? "special" : "", s.text)));
  $("prompt-tokens").textContent = `(${rendered.tokens} tokens)`;
  panel.hidden = false;
}

async function guarded(work) {
  if (state.busy || !state.session) return;
  state.busy = true;
  $("send").disabled = true;
  try {
    await work();
  } catch (error) {
    addTurn("error", String(error.message || error));
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

function submit(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text) return;
  $("input").value = "";
  guarded(() => send(text));
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", submit);
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) submit(event);
  });
  $("connect").addEventListener("click", connect);
  $("show-prompt").addEventListener("click", () => guarded(showPrompt));
  $("new-chat").addEventListener("click", () => guarded(async () => {
    state.messages = [];
    $("log").replaceChildren();
    $("prompt-panel").hidden = true;
    state.session = (await api("/playground/sessions", {})).session;
  }));
  connect();
});
