"""T-Eval-like items (agents.md §1.8, §3): queries answered by chains of 1-4 calls of a toy toolset, each item
carrying what the six abilities are scored against. Nothing is downloaded and nothing depends on the clock.

The toolset is real `@tool` tools with deterministic behaviour: `calculator` (the built-in), `unit_convert`,
`date_diff`, `current_date` (a fixed date: the zero-argument tool), `kv_lookup` over a small world table and
`search_docs` over a few pages about its festivals. **The world is fake** (cities, numbers and festivals are made up),
so a model can only know them by calling the tools.

A chain's gold plan is *executed* through `toolset()` while the item is generated: each step's arguments are built
from the outputs of the steps before it, and its recorded output is what the tool returned, so plan, arguments and
outputs cannot disagree. Per item the generator also picks (seeded) the step the instruct sub-task names, the step
the reason / retrieve / understand sub-tasks stop before, and a review case: a step's call, either the gold one or a
corrupted one (wrong arguments, wrong tool, or arguments the tool rejects), executed too, with its class.

`generate(n, seed)` is seeded like `agents.tasks.generate` (one `random.Random("teval/<seed>")`); evaluation seeds
are >= `agents.tasks.EVAL_SEED_START`. This module is not one of `agents.tasks.SUITES`: its items are not `Problem`s.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import random
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from internlm2_jax.agents.protocol import Call, ToolResult
from internlm2_jax.agents.tools import DocIndex, Document, Tool, ToolError, ToolExecutor, tool
from internlm2_jax.agents.tools.calculator import calculator

# Bump when the items generated for the same arguments change (the tests pin a hash of this version's output).
TEVAL_VERSION = 1
TODAY = "2024-06-01"  # what current_date answers: fixed, so items and scores never depend on the clock
FINISH = "FinishAction"  # T-Eval's name for "answer now" at the end of a plan

# ---- the fake world ----------------------------------------------------------------------------------------------

CITIES: dict[str, dict[str, Any]] = {
    "Avalon": {"population": 81234, "elevation_m": 312, "founded": "1642-05-17", "country": "Norland"},
    "Borea": {"population": 45210, "elevation_m": 1280, "founded": "1811-09-02", "country": "Norland"},
    "Caldera": {"population": 230457, "elevation_m": 45, "founded": "1503-03-30", "country": "Sudmark"},
    "Dunmore": {"population": 12876, "elevation_m": 2045, "founded": "1920-11-11", "country": "Sudmark"},
    "Elmstead": {"population": 67390, "elevation_m": 158, "founded": "1764-07-04", "country": "Westria"},
    "Fjordvik": {"population": 9431, "elevation_m": 12, "founded": "1888-01-21", "country": "Westria"},
    "Galen": {"population": 154022, "elevation_m": 733, "founded": "1599-12-08", "country": "Ostholm"},
    "Hollow Reach": {"population": 31508, "elevation_m": 967, "founded": "1702-06-15", "country": "Ostholm"},
}
FIELDS = ("population", "elevation_m", "founded", "country")
FIELD_WORDS = {"population": "population", "elevation_m": "elevation in meters", "founded": "founding date",
               "country": "country"}
FESTIVALS = {"Lantern Festival": ("Avalon", "spring"), "Frost Fair": ("Borea", "winter"),
             "Harvest Moon Parade": ("Caldera", "autumn"), "Summit Games": ("Dunmore", "summer"),
             "Tide Regatta": ("Fjordvik", "summer"), "Clockmakers' Week": ("Galen", "autumn")}

# Factors to one base unit per dimension.
UNITS: dict[str, tuple[str, float]] = {
    "m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "ft": ("length", 0.3048),
    "mi": ("length", 1609.344), "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237),
}
Unit = Literal["m", "km", "cm", "ft", "mi", "kg", "g", "lb"]


# ---- the tools ---------------------------------------------------------------------------------------------------


@tool
def unit_convert(value: float, from_unit: Unit, to_unit: Unit) -> float:
    """Convert a length or a mass from one unit to another (rounded to 3 decimals).

    Args:
        value: The amount to convert.
        from_unit: The unit of `value`.
        to_unit: The unit to convert to (the same kind of quantity).
    """
    (kind, factor), (to_kind, to_factor) = UNITS[from_unit], UNITS[to_unit]
    if kind != to_kind:
        raise ToolError(f"cannot convert {kind} ({from_unit}) to {to_kind} ({to_unit})")
    return round(value * factor / to_factor, 3)


def _date(text: str, name: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise ToolError(f"{name}: {text!r} is not a date written YYYY-MM-DD") from None


@tool
def date_diff(start: str, end: str) -> int:
    """The number of days from one date to another (negative when `end` is earlier).

    Args:
        start: The first date, YYYY-MM-DD.
        end: The second date, YYYY-MM-DD.
    """
    return (_date(end, "end") - _date(start, "start")).days


@tool
def current_date() -> str:
    """Today's date, YYYY-MM-DD."""
    return TODAY


@tool
def kv_lookup(key: str, field: Literal["population", "elevation_m", "founded", "country"]) -> int | str:
    """Look up a fact about a city in the world table.

    Args:
        key: The city's name, e.g. "Avalon".
        field: Which fact: population, elevation_m (meters above sea level), founded (YYYY-MM-DD) or country.
    """
    if key not in CITIES:
        raise ToolError(f"no city named {key!r}; known cities: {', '.join(CITIES)}")
    return CITIES[key][field]


@functools.cache
def festival_index() -> DocIndex:
    return DocIndex(Document(name, f"The {name} is held every {season} in {city}, {CITIES[city]['country']}.")
                    for name, (city, season) in FESTIVALS.items())


@tool(name="search_docs")
def search_world_docs(query: str, k: Annotated[int, {"minimum": 1, "maximum": 5}] = 1) -> list[dict[str, str]]:
    """Search the pages about the world's festivals. Returns the titles and texts of the best matches.

    Args:
        query: What to look for, in words.
        k: How many results to return.
    """
    return [{"title": doc.title, "text": doc.text} for doc, _ in festival_index().search(query, k)]


TOOLS = (calculator, unit_convert, date_diff, current_date, kv_lookup, search_world_docs)
# Out of distribution (agents.md §3, held-out check 2): the same tools under other names, announced in another order
# with their parameters listed in reverse, so a model that memorised names or positions is found out.
OOD_NAMES = {"calculator": "evaluate_math", "unit_convert": "convert_units", "date_diff": "days_between",
             "current_date": "today", "kv_lookup": "city_facts", "search_docs": "find_pages"}
OOD_ORDER = ("city_facts", "today", "find_pages", "evaluate_math", "days_between", "convert_units")


def _ood_tool(tool: Tool) -> Tool:
    parameters = dict(tool.parameters)
    parameters["properties"] = dict(reversed(list(tool.parameters.get("properties", {}).items())))
    if "required" in parameters:
        parameters["required"] = list(reversed(parameters["required"]))
    return dataclasses.replace(tool, name=OOD_NAMES[tool.name], parameters=parameters)


def toolset(ood: bool = False) -> ToolExecutor:
    """The toy toolset, in the order the model is shown it; `ood`: renamed, reordered, parameters reversed."""
    if not ood:
        return ToolExecutor(TOOLS)
    renamed = {tool.name: tool for tool in map(_ood_tool, TOOLS)}
    return ToolExecutor([renamed[name] for name in OOD_ORDER])


def execute(executor: ToolExecutor, name: str, args: Mapping[str, Any]) -> ToolResult:
    return executor(Call("plugin", name, dict(args), ""))


# ---- items -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    thought: str  # why this call: the reason sub-task's gold thought
    subgoal: str  # the structured next sub-goal (SUBGOAL_FORMS), matched exactly
    name: str
    args: dict[str, Any]
    output: Any  # what the tool returned (JSON-ready)


REVIEW_LABELS = ("success", "tool_error", "wrong_arguments", "wrong_tool")


@dataclasses.dataclass(frozen=True)
class ReviewCase:
    step: int  # the step whose call is judged (the steps before it are shown with their gold calls)
    name: str  # the call shown (gold or corrupted)
    args: dict[str, Any]
    status: str  # its executed result: ToolResult.status, value, error
    value: Any
    error: str | None
    label: str  # one of REVIEW_LABELS


@dataclasses.dataclass(frozen=True)
class TEvalItem:
    id: str  # "teval-<seed>-<index>"
    chain: str  # the chain template's name
    query: str
    steps: tuple[Step, ...]  # the gold plan, executed
    instruct_step: int  # the step whose call the instruct sub-task dictates
    focus: int  # reason / retrieve / understand: the steps before it are done, it is the one to predict
    review: ReviewCase

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The forms a sub-goal is written in (shown to the model by the reason prompt).
SUBGOAL_FORMS = {"kv_lookup": "find the {field} of {key}", "unit_convert": "convert {value} {from_unit} to {to_unit}",
                 "calculator": "compute {expression}", "date_diff": "count the days from {start} to {end}",
                 "search_docs": "search for {query}", "current_date": "get the current date"}


class _Plan:
    """Builds a chain's steps by running each through the tools."""

    def __init__(self, executor: ToolExecutor):
        self.executor, self.steps = executor, []

    def __call__(self, thought: str, name: str, **args: Any) -> Any:
        result = execute(self.executor, name, args)
        if result.status != "ok":
            raise RuntimeError(f"gold step {name}({args}) failed: {result.error}")  # a bug in a chain template
        self.steps.append(Step(thought, SUBGOAL_FORMS[name].format(**args), name, args, result.value))
        return result.value


def _calc(rng: random.Random, run: _Plan) -> str:
    a, b, c = rng.randint(12, 999), rng.randint(12, 999), rng.randint(1, 9999)
    run(f"The question is pure arithmetic, so I will compute {a} * {b} + {c} with the calculator.", "calculator",
        expression=f"{a} * {b} + {c}")
    return f"What is {a} times {b} plus {c}?"


def _convert(rng: random.Random, run: _Plan) -> str:
    kind = rng.choice(("length", "mass"))
    source, target = rng.sample(sorted(u for u, (k, _) in UNITS.items() if k == kind), 2)
    value = rng.randint(2, 5000)
    run(f"I need to convert {value} {source} into {target}, which the unit converter does.", "unit_convert",
        value=value, from_unit=source, to_unit=target)
    return f"How many {target} are {value} {source}?"


def _lookup(rng: random.Random, run: _Plan) -> str:
    city, field = rng.choice(sorted(CITIES)), rng.choice(FIELDS)
    run(f"The {FIELD_WORDS[field]} of {city} is in the world table, so I will look it up.", "kv_lookup",
        key=city, field=field)
    return f"What is the {FIELD_WORDS[field]} of {city}?"


def _height_in_feet(rng: random.Random, run: _Plan) -> str:
    city = rng.choice(sorted(CITIES))
    meters = run(f"First I look up the elevation of {city} in meters.", "kv_lookup", key=city, field="elevation_m")
    run(f"{city} lies {meters} m above sea level; now I convert that to feet.", "unit_convert", value=meters,
        from_unit="m", to_unit="ft")
    return f"How high above sea level is {city}, in feet?"


def _difference(rng: random.Random, run: _Plan) -> str:
    a, b = sorted(rng.sample(sorted(CITIES), 2), key=lambda city: -CITIES[city]["population"])
    pa = run(f"I need both populations; first I look up the population of {a}.", "kv_lookup", key=a,
             field="population")
    pb = run(f"Next I look up the population of {b}.", "kv_lookup", key=b, field="population")
    run(f"Now I subtract the population of {b} from that of {a}.", "calculator", expression=f"{pa} - {pb}")
    return f"How many more people live in {a} than in {b}?"


def _age(rng: random.Random, run: _Plan) -> str:
    city = rng.choice(sorted(CITIES))
    today = run("To count days until today I first need the current date.", "current_date")
    founded = run(f"Next I look up when {city} was founded.", "kv_lookup", key=city, field="founded")
    run(f"Now I count the days from the founding date {founded} to today, {today}.", "date_diff", start=founded,
        end=today)
    return f"How many days ago was {city} founded?"


def _festival(rng: random.Random, run: _Plan, *, field: str) -> str:
    festival = rng.choice(sorted(FESTIVALS))
    [page] = run(f"I do not know where the {festival} is held, so I search the festival pages.", "search_docs",
                 query=festival)
    city = FESTIVALS[festival][0]
    if city not in page["text"]:
        raise RuntimeError(f"search_docs did not find the page of the {festival}")  # a bug in the index
    value = run(f"The {festival} is held in {city}; now I look up its {FIELD_WORDS[field]}.", "kv_lookup", key=city,
                field=field)
    if field == "elevation_m":
        run(f"{city} lies {value} m above sea level; now I convert that to feet.", "unit_convert", value=value,
            from_unit="m", to_unit="ft")
        return f"How high above sea level, in feet, is the city that hosts the {festival}?"
    return f"What is the {FIELD_WORDS[field]} of the city that hosts the {festival}?"


def _total(rng: random.Random, run: _Plan) -> str:
    cities = rng.sample(sorted(CITIES), 3)
    counts = [run(f"{'First' if i == 0 else 'Next'} I look up the population of {city}.", "kv_lookup", key=city,
                  field="population") for i, city in enumerate(cities)]
    run("Now I add the three populations.", "calculator", expression=" + ".join(map(str, counts)))
    return f"How many people live in {cities[0]}, {cities[1]} and {cities[2]} together?"


CHAINS: dict[str, Callable[[random.Random, _Plan], str]] = {
    "calc": _calc, "convert": _convert, "lookup": _lookup, "height_in_feet": _height_in_feet,
    "difference": _difference, "age": _age, "total": _total,
    "festival_population": functools.partial(_festival, field="population"),
    "festival_height": functools.partial(_festival, field="elevation_m"),
}


def _wrong_arguments(rng: random.Random, step: Step) -> dict[str, Any] | None:
    """Arguments the tool accepts that do not fit the step's goal; None for a tool without arguments."""
    args = dict(step.args)
    if step.name == "kv_lookup":
        args["key"] = rng.choice(sorted(set(CITIES) - {step.args["key"]}))
    elif step.name == "unit_convert":
        kind = UNITS[step.args["from_unit"]][0]
        args["to_unit"] = rng.choice(sorted(u for u, (k, _) in UNITS.items()
                                            if k == kind and u not in (step.args["from_unit"], step.args["to_unit"])))
    elif step.name == "calculator":
        args["expression"] = re.sub(r"\d+", lambda m: str(int(m.group()) + 1), step.args["expression"], count=1)
    elif step.name == "date_diff":
        args = {"start": step.args["end"], "end": step.args["start"]}
    elif step.name == "search_docs":
        args["query"] = rng.choice(sorted(set(FESTIVALS) - {step.args["query"]}))
    else:
        return None
    return args


def _rejected_arguments(step: Step) -> dict[str, Any]:
    """Arguments that make the step's tool report an error."""
    if step.name == "kv_lookup":
        return {**step.args, "key": "Atlantis"}
    if step.name == "unit_convert":
        return {**step.args, "to_unit": "kg" if UNITS[step.args["from_unit"]][0] == "length" else "m"}
    if step.name == "calculator":
        return {"expression": f"({step.args['expression']}) / 0"}
    if step.name == "date_diff":
        return {**step.args, "start": "2023-02-30"}
    if step.name == "search_docs":
        return {**step.args, "k": 0}
    return {"timezone": "UTC"}  # current_date takes none


def _review(rng: random.Random, executor: ToolExecutor, steps: tuple[Step, ...]) -> ReviewCase:
    index = rng.randrange(len(steps))
    step = steps[index]
    wrong = _wrong_arguments(rng, step)
    label = rng.choice([label for label in REVIEW_LABELS if label != "wrong_arguments" or wrong is not None])
    name, args = step.name, step.args
    if label == "tool_error":
        args = _rejected_arguments(step)
    elif label == "wrong_arguments":
        args = wrong
    elif label == "wrong_tool":
        name, args = (("kv_lookup", {"key": rng.choice(sorted(CITIES)), "field": "population"})
                      if step.name == "search_docs" else ("search_docs", {"query": step.subgoal}))
    result = execute(executor, name, args)
    if (result.status == "ok") == (label == "tool_error"):
        raise RuntimeError(f"review case {label} of {name}({args}) gave status {result.status}")
    return ReviewCase(index, name, args, result.status, result.value, result.error, label)


def item(rng: random.Random, item_id: str, executor: ToolExecutor) -> TEvalItem:
    chain = rng.choice(sorted(CHAINS))
    run = _Plan(executor)
    query = CHAINS[chain](rng, run)
    steps = tuple(run.steps)
    return TEvalItem(item_id, chain, query, steps, rng.randrange(len(steps)), rng.randrange(len(steps)),
                     _review(rng, executor, steps))


def generate(n: int, seed: int) -> list[TEvalItem]:
    """`n` items, the same for the same arguments on every machine (see the module docstring)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"teval/{seed}")
    executor = toolset()
    return [item(rng, f"teval-{seed}-{i}", executor) for i in range(n)]


def ood_item(item: TEvalItem) -> TEvalItem:
    """`item` with every tool name as `toolset(ood=True)` calls it (errors that quote a name included)."""
    def rename(name: str) -> str:
        return OOD_NAMES.get(name, name)

    def retext(text: str | None) -> str | None:
        for old, new in OOD_NAMES.items():
            text = None if text is None else text.replace(old, new)
        return text

    steps = tuple(dataclasses.replace(step, name=rename(step.name)) for step in item.steps)
    review = dataclasses.replace(item.review, name=rename(item.review.name), error=retext(item.review.error))
    return dataclasses.replace(item, steps=steps, review=review)
