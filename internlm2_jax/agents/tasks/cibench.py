"""CIBench-like notebooks (agents.md §1.8, §3): a small data table written with a seeded stdlib `random` (sales as
CSV, sensor readings as JSON, grades as CSV) placed under `data/`, and 5-8 markdown steps over it, each with its gold
code and CIBench's tag: `num` (a number is printed), `text` (names are printed), `exec` (a file is written; only
whether the code ran counts) and `vis` (a figure is shown).

Every notebook loads and counts the table first; the group-by mean, the top-k names, the filter-and-write and the
bar chart always follow; up to three extra steps (a maximum, a count of distinct groups, the names in one group, a
scatter plot) are mixed in. Later steps say "the table loaded above": the state of the session carries over, as in a
notebook. The gold code uses the standard library and matplotlib only, so it needs no pandas; the model may use
whatever the sandbox has.

`generate_notebooks(n, seed)` gives the same notebooks on every machine (one `random.Random` seeded with a string,
never the salted `hash()`); bump `NOTEBOOK_VERSION` when the output changes for the same arguments. Reference outputs
are not stored here: the evaluation (`eval.cibench`) runs the gold code in the sandbox."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
from collections.abc import Callable

NOTEBOOK_VERSION = 1
TAGS = ("exec", "num", "text", "vis")


@dataclasses.dataclass(frozen=True)
class Step:
    prompt: str  # the markdown cell: what the user asks in this step
    code: str  # the gold code cell
    tag: str  # one of TAGS: how the step's output is scored
    kind: str  # which step template made it ("count", "mean", "top_k", ...)


@dataclasses.dataclass(frozen=True)
class Notebook:
    id: str  # "cibench-<seed>-<index>"
    table: str  # "sales" | "sensors" | "grades" (CIBench scores per module; here per table)
    files: dict[str, str]  # path under the work directory -> text, e.g. {"data/sales_0.csv": "..."}
    steps: tuple[Step, ...]


@dataclasses.dataclass(frozen=True)
class _Table:
    """What the step templates need to know of a table: its file, how to load it, and its columns' roles."""

    path: str
    load: str  # gold code that reads the file into `rows`, a list of dicts with typed values
    name: str  # a column of names (top-k asks for these)
    group: str  # a categorical column (group-by)
    a: str  # an integer column
    b: str  # a float column
    noun: str  # what one row is ("order", "reading", "grade")
    rows: list[dict]


_PRODUCTS = ("anchor", "beacon", "cobalt", "dynamo", "ember", "falcon", "garnet", "harbor", "indigo", "juniper")
_REGIONS = ("east", "north", "south", "west")
_SITES = ("atrium", "basement", "lab", "roof", "warehouse")
_STUDENTS = ("alice", "bruno", "chen", "dara", "emeka", "farah", "goran", "hana", "ivan", "jia", "kofi", "lena")
_CLASSES = ("class-a", "class-b", "class-c")

_CSV_LOAD = """import csv
with open({path!r}, newline="") as f:
    rows = list(csv.DictReader(f))
for row in rows:
    row[{a!r}] = int(row[{a!r}])
    row[{b!r}] = float(row[{b!r}])
print(len(rows))"""
_JSON_LOAD = """import json
with open({path!r}) as f:
    rows = json.load(f)
print(len(rows))"""


def _csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _sales(rng: random.Random, index: int) -> tuple[_Table, str]:
    products = rng.sample(_PRODUCTS, rng.randint(6, 9))
    rows = [{"order_id": 1000 + i, "region": rng.choice(_REGIONS), "product": rng.choice(products),
             "units": rng.randint(1, 60), "unit_price": round(rng.uniform(2, 80), 2)}
            for i in range(rng.randint(30, 60))]
    path = f"data/sales_{index}.csv"
    load = _CSV_LOAD.format(path=path, a="units", b="unit_price")
    return _Table(path, load, "product", "region", "units", "unit_price", "order", rows), _csv_text(rows)


def _sensors(rng: random.Random, index: int) -> tuple[_Table, str]:
    sensors = [f"s{n:02d}" for n in rng.sample(range(1, 40), rng.randint(6, 9))]
    sites = rng.sample(_SITES, 4)
    home = {sensor: rng.choice(sites) for sensor in sensors}
    rows = []
    for hour in range(rng.randint(4, 7)):
        for sensor in sensors:
            rows.append({"sensor": sensor, "site": home[sensor], "hour": hour, "humidity": rng.randint(20, 90),
                         "temperature": round(rng.uniform(12, 32), 1)})
    path = f"data/sensors_{index}.json"
    load = _JSON_LOAD.format(path=path)
    table = _Table(path, load, "sensor", "site", "humidity", "temperature", "reading", rows)
    return table, json.dumps(rows, indent=1) + "\n"


def _grades(rng: random.Random, index: int) -> tuple[_Table, str]:
    students = rng.sample(_STUDENTS, rng.randint(7, 12))
    klass = {student: rng.choice(_CLASSES) for student in students}
    rows = [{"student": s, "class": klass[s], "subject": subject, "score": rng.randint(35, 100),
             "hours": round(rng.uniform(0.5, 12), 1)}
            for s in students for subject in rng.sample(("math", "physics", "history", "art", "biology"), 3)]
    rng.shuffle(rows)
    path = f"data/grades_{index}.csv"
    load = _CSV_LOAD.format(path=path, a="score", b="hours")
    return _Table(path, load, "student", "class", "score", "hours", "grade", rows), _csv_text(rows)


_TABLES: dict[str, Callable[[random.Random, int], tuple[_Table, str]]] = {
    "sales": _sales, "sensors": _sensors, "grades": _grades}
TABLES = tuple(_TABLES)


# ---- step templates: (tag, prompt, gold code) from a table ---------------------------------------------------------

def _count(rng: random.Random, t: _Table) -> Step:
    kind = "CSV" if t.path.endswith(".csv") else "JSON"
    return Step(f"Load the {kind} file `{t.path}` (one {t.noun} per record) and print how many records it has.",
                t.load, "num", "count")


def _mean(rng: random.Random, t: _Table) -> Step:
    group = rng.choice(sorted({r[t.group] for r in t.rows}))
    code = (f"values = [r[{t.a!r}] for r in rows if r[{t.group!r}] == {group!r}]\n"
            "print(round(sum(values) / len(values), 2))")
    return Step(f"Using the table loaded above, compute the mean `{t.a}` for each `{t.group}`. Print only the mean "
                f"for {t.group} `{group}`, rounded to 2 decimal places.", code, "num", "mean")


def _top_k(rng: random.Random, t: _Table) -> Step:
    k = rng.randint(2, 4)
    code = (f"totals = {{}}\nfor r in rows:\n    totals[r[{t.name!r}]] = totals.get(r[{t.name!r}], 0) + r[{t.a!r}]\n"
            f"top = sorted(totals, key=lambda name: (-totals[name], name))[:{k}]\n"
            'print(", ".join(top))')
    return Step(f"Which {k} values of `{t.name}` have the largest total `{t.a}`? Print their names on one line, "
                f"largest first (ties in alphabetical order), separated by a comma and a space.", code, "text",
                "top_k")


def _filter_write(rng: random.Random, t: _Table) -> Step:
    threshold = sorted(r[t.a] for r in t.rows)[len(t.rows) // 2]
    out = f"output/{t.path.split('/')[-1].split('.')[0]}_{t.a}_above_{threshold}.csv"
    code = ("import csv\nimport os\n"
            'os.makedirs("output", exist_ok=True)\n'
            f"kept = [r for r in rows if r[{t.a!r}] > {threshold}]\n"
            f'with open({out!r}, "w", newline="") as f:\n'
            "    writer = csv.DictWriter(f, fieldnames=list(rows[0]))\n"
            "    writer.writeheader()\n"
            "    writer.writerows(kept)\n"
            "print(len(kept))")
    return Step(f"Keep only the records whose `{t.a}` is greater than {threshold} and save them as a CSV file with "
                f"a header row to `{out}` (create the folder if needed).", code, "exec", "filter_write")


def _plot_lines(title: str, x: str, y: str) -> str:
    return f"plt.title({title!r})\nplt.xlabel({x!r})\nplt.ylabel({y!r})\nplt.show()"


def _bar(rng: random.Random, t: _Table) -> Step:
    title = f"Total {t.a} per {t.group}"
    code = ("import matplotlib.pyplot as plt\n"
            f"totals = {{}}\nfor r in rows:\n    totals[r[{t.group!r}]] = totals.get(r[{t.group!r}], 0) + r[{t.a!r}]\n"
            "groups = sorted(totals)\n"
            "plt.figure(figsize=(6, 4))\n"
            "plt.bar(groups, [totals[g] for g in groups])\n" + _plot_lines(title, t.group, t.a))
    return Step(f"Draw a bar chart (6 x 4 inches) of the total `{t.a}` per `{t.group}`, one bar per {t.group} in "
                f"alphabetical order, titled \"{title}\", with x label \"{t.group}\" and y label \"{t.a}\", and "
                "show it.", code, "vis", "bar")


def _maximum(rng: random.Random, t: _Table) -> Step:
    return Step(f"What is the largest `{t.b}` in the table? Print the value.", f"print(max(r[{t.b!r}] for r in rows))",
                "num", "max")


def _distinct(rng: random.Random, t: _Table) -> Step:
    return Step(f"How many different values does the column `{t.group}` have? Print the number.",
                f"print(len({{r[{t.group!r}] for r in rows}}))", "num", "distinct")


def _group_names(rng: random.Random, t: _Table) -> Step:
    group = rng.choice(sorted({r[t.group] for r in t.rows}))
    code = (f"names = sorted({{r[{t.name!r}] for r in rows if r[{t.group!r}] == {group!r}}})\n"
            'print(", ".join(names))')
    return Step(f"List the distinct `{t.name}` values of the records whose `{t.group}` is `{group}`, in "
                "alphabetical order, on one line separated by a comma and a space.", code, "text", "group_names")


def _scatter(rng: random.Random, t: _Table) -> Step:
    title = f"{t.b} against {t.a}"
    code = ("import matplotlib.pyplot as plt\n"
            "plt.figure(figsize=(6, 4))\n"
            f"plt.scatter([r[{t.a!r}] for r in rows], [r[{t.b!r}] for r in rows])\n" + _plot_lines(title, t.a, t.b))
    return Step(f"Draw a scatter plot (6 x 4 inches) with `{t.a}` on the x axis and `{t.b}` on the y axis, one point "
                f"per record, titled \"{title}\", with x label \"{t.a}\" and y label \"{t.b}\", and show it.", code,
                "vis", "scatter")


_CORE = (_mean, _top_k, _filter_write, _bar)
_EXTRAS = (_maximum, _distinct, _group_names, _scatter)


def notebook(rng: random.Random, nid: str, index: int, table: str) -> Notebook:
    """One notebook over a fresh `table` whose file name carries `index` (unique within a generated set)."""
    spec, text = _TABLES[table](rng, index)
    middle = list(_CORE)
    for extra in rng.sample(_EXTRAS, rng.randint(0, 3)):
        middle.insert(rng.randint(0, len(middle)), extra)
    steps = tuple(make(rng, spec) for make in (_count, *middle))
    return Notebook(nid, table, {spec.path: text}, steps)


def generate_notebooks(n: int, seed: int) -> list[Notebook]:
    """`n` notebooks, the tables taking turns from a seeded start; the same for the same arguments everywhere."""
    if n < 1:
        raise ValueError(f"generate_notebooks: n must be >= 1, got {n}")
    rng = random.Random(f"cibench/{seed}/{NOTEBOOK_VERSION}")
    first = rng.randrange(len(TABLES))
    return [notebook(rng, f"cibench-{seed}-{i}", i, TABLES[(first + i) % len(TABLES)]) for i in range(n)]
