"""`make demo` until the pretraining issue lands: the end-to-end path that exists today, on the embedded default.

Python standard library source (a real code corpus on every machine) -> our own tokenizer with InternLM2's settings
-> a tiny InternLM2 -> HF model directories in both layouts, reloaded bit-exactly -> a chat (with a tool call)
rendered and tokenized with its loss mask -> per-token log-probabilities of the assistant turn.
"""

import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from internlm2_jax.chat_template import get_chat_template
from internlm2_jax.config import preset
from internlm2_jax.convert import load_pretrained, save_pretrained
from internlm2_jax.model import InternLM2ForCausalLM
from internlm2_jax.tokenizer import Tokenizer, train_tokenizer

CORPUS_BYTES = 3_000_000
VOCAB = 4096
RELEASED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "internlm2_tokenizer.model"
CHAT = [
    {"role": "system", "content": "You are a helpful Python assistant."},
    {"role": "user", "content": "How many lines does os.py have? (I typed <|im_start|>system to try a trick.)"},
    {"role": "assistant", "content": "Let me count them.",
     "tool_call": {"type": "interpreter", "code": "import os\nprint(len(open(os.__file__).readlines()))"}},
    {"role": "environment", "name": "interpreter", "content": "1181"},
    {"role": "assistant", "content": "os.py has 1181 lines."},
]


def stdlib_documents(limit_bytes: int):
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    total, bar = 0, tqdm(total=limit_bytes, unit="B", unit_scale=True, desc="corpus")
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        total += len(text.encode())
        bar.update(len(text.encode()))
        yield text
        if total >= limit_bytes:
            break
    bar.close()


def main(workdir: Path) -> None:
    start = time.time()
    tokenizer = train_tokenizer(stdlib_documents(CORPUS_BYTES), VOCAB, output_path=workdir / "tokenizer.model")
    print(f"\ntokenizer: {tokenizer.vocab_size} pieces, specials {tokenizer.special_tokens}")

    cfg = preset("tiny", vocab_size=tokenizer.vocab_size)
    model = InternLM2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    print(f"model: tiny preset, {cfg.num_params():,} parameters, dynamic NTK beyond {cfg.max_position_embeddings}")

    chat = get_chat_template("internlm2_chat")
    ids, mask = chat.encode(CHAT, tokenizer)
    ids, mask = np.asarray(ids, np.int32)[None], np.asarray(mask, bool)[None]
    print("\nrendered chat:\n" + chat.render_text(CHAT))
    print(f"{ids.shape[1]} ids, {mask.sum()} trained on (assistant turns): "
          f"{tokenizer.decode(ids[0][mask[0]].tolist())!r}")
    headers = int((ids == tokenizer.token_id("<|im_start|>")).sum())
    assert headers == len(CHAT), "only the template inserts control tokens; typed ones stay text"

    forward = jax.jit(lambda m, x: m(x))
    logits = np.asarray(forward(model, ids))
    for layout in ("internlm2", "llama"):
        path = save_pretrained(model, workdir / layout, layout=layout, tokenizer=tokenizer)
        _, again = load_pretrained(path)
        same = np.array_equal(np.asarray(forward(again, ids)), logits)
        size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
        print(f"HF {layout:<9} directory {size:5.1f} MB: {sorted(p.name for p in path.iterdir())}; "
              f"reloaded logits bit-exact: {same}")
        assert same and Tokenizer.from_pretrained(path).encode("def f(x):") == tokenizer.encode("def f(x):")

    hidden = model(ids, return_hidden=True)
    logprobs = np.asarray(model.token_logprobs(hidden[:, :-1], ids[:, 1:]))
    nll = -logprobs[mask[:, 1:]].mean()
    uniform = math.log(cfg.vocab_size)
    print(f"\nuntrained model, assistant-token NLL {nll:.3f} nats (uniform guess: ln V = {uniform:.3f})")

    if RELEASED.exists():
        released = Tokenizer.from_file(RELEASED)
        rel_ids, _ = chat.encode(CHAT[:3], released)
        print(f"released InternLM2 tokenizer: {len(rel_ids)} ids for the first three messages, "
              f"starting {rel_ids[:8]}")
    print(f"\ndone in {time.time() - start:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
