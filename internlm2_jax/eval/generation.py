"""The GEN inferencer: prompts completed by the continuous-batching engine (stop strings, greedy), answers extracted
by a named postprocessor and compared with the references extracted the same way. A run where too many predictions
extract to nothing fails loudly instead of scoring them wrong (`postprocess.check_extraction`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from internlm2_jax.decode.engine import Engine, EngineConfig
from internlm2_jax.decode.requests import Request
from internlm2_jax.eval.postprocess import check_extraction, get_postprocessor
from internlm2_jax.eval.tasks import Prompter, Task, read_rows


def prompt_ids(tokenizer, text: str, *, chat: bool, bos: bool, chat_template: str = "internlm2_chat"):
    """(ids, stop ids): `text` as a user turn through the chat template, or as plain text."""
    if chat:
        from internlm2_jax.chat_template import get_chat_template

        ids = get_chat_template(chat_template).encode([{"role": "user", "content": text}], tokenizer,
                                                      add_generation_prompt=True)[0]
        return ids, (tokenizer.token_id("</s>"), tokenizer.token_id("<|im_end|>"))
    return tokenizer.encode(text, add_bos=bos, allow_special=False), (tokenizer.eos_id,)


def complete(model, tokenizer, prompts: Sequence[list[int]], stop_ids, *, max_new_tokens: int,
             stop: Sequence[str] = (), max_running: int = 16, progress: bool = False) -> list[str]:
    """Greedy completions of token-id prompts through one engine sized for them."""
    longest = max(map(len, prompts)) + max_new_tokens
    engine = Engine(model, tokenizer, EngineConfig(max_model_len=longest, kv_budget_tokens=max_running * longest,
                                                   max_running=max_running,
                                                   prefill_chunk=min(256, 1 << (longest - 1).bit_length())))
    requests = [Request(tuple(ids), max_new_tokens, stop_ids=tuple(stop_ids), stop_strings=tuple(stop))
                for ids in prompts]
    return [c.text for c in engine.generate(requests, progress=progress)]


def run_gen(model, tokenizer, task: Task, *, progress: bool = False, max_running: int = 16) -> dict[str, Any]:
    """Accuracy of the extracted answers (exact match after the task's postprocessor)."""
    task.validate()
    rows = read_rows(task.reader.path)
    prompter = Prompter(task)
    encoded = [prompt_ids(tokenizer, prompter.context(i, row), chat=task.prompt.chat, bos=task.prompt.bos)
               for i, row in enumerate(rows)]
    outputs = complete(model, tokenizer, [ids for ids, _ in encoded], encoded[0][1],
                       max_new_tokens=task.max_new_tokens, stop=task.stop, max_running=max_running,
                       progress=progress)
    post = get_postprocessor(task.postprocessor)
    predictions = [post(text) for text in outputs]
    check_extraction(predictions, max_empty_share=task.max_empty_share, dataset=task.name, outputs=outputs)
    references = []
    for i, row in enumerate(rows):
        if task.reader.answer not in row:
            raise ValueError(f"{task.reader.path} row {i}: no answer field {task.reader.answer!r}")
        references.append(post(str(row[task.reader.answer])))
    correct = [p == r for p, r in zip(predictions, references, strict=True)]
    return {"task": task.name, "group": task.group, "prompt_hash": task.prompt_hash(), "mode": "gen",
            "rows": len(rows),
            "accuracy": sum(correct) / len(rows),
            "details": [{"output": o, "prediction": p, "reference": r}
                        for o, p, r in zip(outputs, predictions, references, strict=True)]}
