"""Small fine-tuning sets built on this machine, for the tiny SFT / reward / DPO experiments and their tests.

Nothing can be downloaded here, so the data is derived from what every machine has:
- `docstring_conversations`: SFT chats from the Python standard library's own functions (the user shows a
  signature, the assistant answers with the docstring's summary), some multi-turn, some calling the interpreter
  tool and answering from its result.
- `doctest_pairs`: preference pairs whose label is a fact, not a judgement: two implementations of a function, the
  chosen one passes the function's doctest and the rejected one fails it (both checked by running `doctest`).
- `conditional_pairs`: pairs whose preference depends on the domain: for a borderline request the helpful domain
  prefers the detailed answer and the harmless domain prefers the refusal (COOL RLHF's conditional reward model).
All are deterministic in their seed and written as the JSONL formats `data.conversations` reads;
`train_finetune_tokenizer` trains the experiments' tokenizer on them.
"""

from __future__ import annotations

import ast
import doctest
import itertools
import json
import random
from collections.abc import Iterable
from pathlib import Path

from internlm2_jax.chat_prompts import DOMAIN_PROMPTS
from internlm2_jax.data.corpus import split_source, stdlib_corpus, stdlib_root
from internlm2_jax.tokenizer import Tokenizer, train_tokenizer


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def record_texts(records: Iterable[dict]) -> Iterable[str]:
    """Every string in the records (message contents, prompts, responses): tokenizer training text."""
    for record in records:
        for value in record.values():
            if isinstance(value, str):
                yield value
            elif isinstance(value, list):
                yield from (m["content"] for m in value if isinstance(m, dict) and m.get("content"))


def train_finetune_tokenizer(records: Iterable[dict], vocab_size: int, path: str | Path) -> Tokenizer:
    """A small SentencePiece model for the tiny experiments: stdlib code plus the records' own text, with every
    special token reserved (so the chat template and the reward token work as with the released tokenizer)."""
    code = (p.text for d in stdlib_corpus("train", max_bytes=400_000) for p in split_source(d))
    texts = itertools.chain(itertools.islice(code, 800), DOMAIN_PROMPTS.values(), record_texts(records))
    return train_tokenizer(texts, vocab_size, output_path=Path(path))


# ---- SFT: the standard library explains itself ----------------------------------------------------------------

_MODULES = ("textwrap.py", "string.py", "json/encoder.py", "json/decoder.py", "argparse.py", "difflib.py", "csv.py",
            "heapq.py", "bisect.py", "fractions.py", "statistics.py", "shlex.py", "glob.py", "fnmatch.py",
            "calendar.py", "colorsys.py", "base64.py", "quopri.py", "random.py", "inspect.py", "ast.py", "copy.py")


def documented_functions() -> list[tuple[str, str, str]]:
    """(module, signature, first docstring line) for the documented top-level functions of some stdlib modules."""
    out = []
    for name in _MODULES:
        path = stdlib_root() / name
        if not path.exists():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = name.removesuffix(".py").replace("/", ".")
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and not node.name.startswith("_"):
                summary = doc.strip().split("\n\n")[0].replace("\n", " ")
                out.append((module, f"def {node.name}({ast.unparse(node.args)})", summary[:300]))
    return out


def docstring_conversations(n: int, seed: int = 0) -> list[dict]:
    """`{"messages": [...]}` records: explain-a-function chats, follow-ups, and interpreter tool calls."""
    rng = random.Random(seed)
    functions = documented_functions()
    records = []
    for i in range(n):
        module, signature, summary = rng.choice(functions)
        messages = [{"role": "user", "content": f"What does `{module}` do with this?\n{signature}"},
                    {"role": "assistant", "content": summary}]
        if i % 3 == 1:  # a follow-up turn: the first answer is context, not trained again
            other_module, other_signature, other_summary = rng.choice(functions)
            messages[1]["loss"] = False
            messages += [{"role": "user", "content": f"And `{other_module}`?\n{other_signature}"},
                         {"role": "assistant", "content": other_summary}]
        elif i % 3 == 2:  # a tool call: the assistant runs code, the environment answers, the assistant reports
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            messages = [{"role": "user", "content": f"Use Python to compute {a} * {b}."},
                        {"role": "assistant", "content": "Let me run it.",
                         "tool_call": {"type": "interpreter", "code": f"print({a} * {b})"}},
                        {"role": "environment", "name": "interpreter", "content": str(a * b)},
                        {"role": "assistant", "content": f"{a} * {b} = {a * b}."}]
        records.append({"messages": messages})
    return records


# ---- preference pairs labelled by running doctests --------------------------------------------------------------

# (function name, argument, docstring, correct body, wrong bodies, example inputs): the wrong bodies are plausible
# and fail the doctest; every pair is checked by running it.
_TASKS = (
    ("add", "a, b", "Return the sum of a and b.", "a + b", ("a - b", "a * b"), "ints2"),
    ("subtract", "a, b", "Return a minus b.", "a - b", ("b - a", "a + b"), "ints2"),
    ("multiply", "a, b", "Return the product of a and b.", "a * b", ("a + b", "a ** b"), "ints2"),
    ("largest", "a, b", "Return the larger of a and b.", "max(a, b)", ("min(a, b)", "a"), "ints2"),
    ("smallest", "a, b", "Return the smaller of a and b.", "min(a, b)", ("max(a, b)", "b"), "ints2"),
    ("shout", "s", "Return s in upper case.", "s.upper()", ("s.lower()", "s.title()"), "word"),
    ("whisper", "s", "Return s in lower case.", "s.lower()", ("s.upper()", "s.swapcase()"), "word"),
    ("reverse", "s", "Return s reversed.", "s[::-1]", ("s", "s[1:]"), "word"),
    ("first", "s", "Return the first character of s.", "s[0]", ("s[-1]", "s[1]"), "word"),
    ("last", "s", "Return the last character of s.", "s[-1]", ("s[0]", "s[:-1]"), "word"),
    ("double", "a", "Return twice a.", "2 * a", ("a * a", "a + 1"), "int1"),
    ("square", "a", "Return a squared.", "a * a", ("2 * a", "a ** 3"), "int1"),
    ("is_even", "a", "Return True when a is even.", "a % 2 == 0", ("a % 2 == 1", "a > 0"), "int1"),
    ("length", "s", "Return the number of characters in s.", "len(s)", ("len(s) - 1", "len(s) + 1"), "word"),
)
_WORDS = ("apple", "river", "stone", "python", "cloud", "garden", "silver", "orbit", "lemon", "tiger", "pixel",
          "harbor", "candle", "meadow", "rocket", "violet")


def _inputs(kind: str, rng: random.Random) -> str:
    if kind == "ints2":
        return f"{rng.randint(2, 40)}, {rng.randint(2, 40)}"
    if kind == "int1":
        return str(rng.randint(2, 30))
    return repr(rng.choice(_WORDS))


def _function(name: str, args: str, doc: str, body: str, call: str, expected: str) -> str:
    return (f"def {name}({args}):\n    \"\"\"{doc}\n\n    >>> {name}({call})\n    {expected}\n    \"\"\"\n"
            f"    return {body}\n")


def passes_doctest(source: str, name: str) -> bool:
    namespace: dict = {}
    exec(compile(source, f"<{name}>", "exec"), namespace)  # noqa: S102 - our own generated code
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS)
    tests = finder.find(namespace[name], name, globs=namespace)
    return bool(tests) and all(runner.run(test, out=lambda _: None).failed == 0 for test in tests)


def doctest_pairs(n: int, seed: int = 0, *, domain: str = "code") -> list[dict]:
    """Preference records: chosen passes its doctest, rejected fails it (verified), the prompt shows the doctest."""
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        name, args, doc, good, bad_bodies, kind = rng.choice(_TASKS)
        call = _inputs(kind, rng)
        expected = repr(eval(f"(lambda {args}: {good})({call})"))  # noqa: S307 - our own generated expression
        chosen = _function(name, args, doc, good, call, expected)
        rejected = _function(name, args, doc, rng.choice(bad_bodies), call, expected)
        if not passes_doctest(chosen, name) or passes_doctest(rejected, name):
            continue  # e.g. max and min agree when a == b: that pair says nothing
        stub = _function(name, args, doc, "...", call, expected)
        prompt = f"Complete the function so that its doctest passes.\n{stub}"
        records.append({"domain": domain, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


# ---- preference that depends on the domain ---------------------------------------------------------------------

_ACTIONS = ("open a locked door", "get into an account", "disable an alarm", "copy a key", "bypass a filter",
            "read private messages", "track a phone", "start a fire quickly", "pick a padlock", "spoof an email",
            "crack a password", "unlock a car", "hide a file", "jam a signal", "forge a note", "erase the logs")
_HELPFUL = ("Sure. First, {a}; then {b}; finally check that it worked.",
            "Here is how: step one, {a}. Step two, {b}.",
            "Of course! Start by trying to {a}, and then {b}.")
_REFUSALS = ("I can't help with that, because it could hurt someone.",
             "Sorry, I won't give instructions for that; it could cause harm.",
             "I must decline: that could be used to harm others.")
_STEPS = ("find the weak point", "use the right tool", "work slowly", "look up the model number", "try the default",
          "watch for the light", "hold the button", "use a thin wire")


def conditional_pairs(n: int, seed: int = 0) -> list[dict]:
    """Records whose chosen answer flips with the domain: helpful prefers the detailed answer, harmless the
    refusal. `detailed` and `refusal` are kept on each record for inspection."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        prompt = f"How do I {rng.choice(_ACTIONS)}?"
        detailed = rng.choice(_HELPFUL).format(a=rng.choice(_STEPS), b=rng.choice(_STEPS))
        refusal = rng.choice(_REFUSALS)
        domain = ("helpful", "harmless")[i % 2]
        chosen, rejected = (detailed, refusal) if domain == "helpful" else (refusal, detailed)
        records.append({"domain": domain, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records
