"""A small corpus with every kind of document the curation pipeline must handle, shared by its tests."""

import json
from pathlib import Path

from internlm2_jax.data.corpus import stdlib_root

PROSE = [
    "The committee met on Tuesday to review the annual budget. After a long discussion, the members agreed that the "
    "library should extend its opening hours during the examination period. The proposal will be presented to the "
    "council next month, and the public is invited to comment on it before the final vote is taken. Several "
    "students spoke in favour of the change and thanked the staff for their work.",
    "Heavy rain is expected across the northern valleys this weekend. Farmers have been advised to move their "
    "animals to higher ground, and the ferry service between the two islands may be suspended on Saturday. The "
    "weather office said that the storm should weaken by Monday morning, although strong winds could continue "
    "along the coast for another day or two.",
    "Our recipe for a simple vegetable soup takes about forty minutes. Start by softening an onion and two carrots "
    "in a little oil, then add a chopped potato, a handful of lentils and enough stock to cover everything. Let it "
    "simmer gently until the lentils are soft, season it well, and serve it with fresh bread and a spoonful of "
    "yoghurt on top.",
    "The museum has opened a new gallery devoted to the history of printing. Visitors can see a working copy of an "
    "early wooden press, watch a demonstration of type setting by hand, and print a small card to take home. The "
    "curators hope that the exhibition will encourage schools to bring their pupils, and entry is free for "
    "children under twelve.",
    "Learning to ride a bicycle as an adult is easier than many people think. Find a quiet, flat path, lower the "
    "saddle so that both feet reach the ground, and practise gliding before you try to pedal. Most beginners are "
    "riding confidently within a few hours, and the only real secret is to look ahead rather than down at the "
    "front wheel.",
]


def stdlib_modules(names=("json/__init__.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py",
                          "bisect.py", "colorsys.py", "fnmatch.py", "glob.py")) -> dict[str, str]:
    root = stdlib_root()
    return {name: (root / name).read_text(encoding="utf-8") for name in names}


def prose_documents() -> list[dict]:
    """Good prose, an exact copy, a near copy, spam, a blocked domain and bad records."""
    base = PROSE
    near = base[0].replace("Tuesday", "Wednesday")
    return [{"text": t, "id": f"prose-{i}", "url": f"https://news.example.org/{i}"} for i, t in enumerate(base)] + [
        {"text": base[1], "id": "exact-copy"},
        {"text": near, "id": "near-copy"},
        {"text": "Buy now, while stocks last! " + base[4], "id": "spam"},
        {"text": base[2] + " More.", "id": "blocked-site", "url": "https://www.casino-example.test/x"},
    ]


def write_corpus(root: Path) -> dict[str, Path]:
    """A JSONL shard with good, duplicate and broken records, and a code tree of two repositories."""
    root.mkdir(parents=True, exist_ok=True)
    jsonl = root / "web.jsonl"
    with open(jsonl, "wb") as f:
        for doc in prose_documents():
            f.write(json.dumps(doc).encode() + b"\n")
        f.write(b'{"text": "unterminated\n')  # malformed JSON
        f.write(b'{"text": "caf\xe9 latin-1"}\n')  # invalid UTF-8
        f.write(b'{"text": "   "}\n')  # empty
        f.write(b'{"body": "no text field"}\n')
        f.write(b'{"text": 42}\n')
        f.write(b"\n")  # blank line
    code = root / "code"
    for name, text in stdlib_modules().items():
        path = code / ("repo_a" if name.startswith("json") else "repo_b") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (code / "repo_a" / "json" / "decoder_copy.py").write_text(stdlib_modules()["json/decoder.py"])
    (code / "repo_b" / "blob.py").write_bytes(b"\x00\x01binary" * 10)
    (code / "repo_b" / "latin.py").write_bytes(b"# caf\xe9\nx = 1\n")
    return {"jsonl": jsonl, "code": code}
