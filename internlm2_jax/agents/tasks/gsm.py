"""GSM-like word problems (agents.md §3): templates of 2–5 steps with integer answers. A template gives its question
and its solution as named steps; the reference program is those steps as Python, and the answer is the same steps
evaluated here, so question, program and answer cannot disagree. Difficulty scales the quantities."""

from __future__ import annotations

import random

from internlm2_jax.agents.tasks import Problem

_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jun", "Kofi", "Lena")
_PERCENTS = (10, 20, 25, 50)  # with amounts that are multiples of 20 these leave integer results

# A template: rng, scale -> (question, inputs {name: int}, steps [(name, expression over earlier names)]).
Template = tuple[str, dict[str, int], list[tuple[str, str]]]


def _shopping(rng: random.Random, s: int) -> Template:
    who, a, p = rng.choice(_NAMES), rng.randint(2, 9), rng.randint(2, 20) * s
    b, q = rng.randint(2, 9), rng.randint(1, 9) * s
    return (f"{who} buys {a} notebooks at ${p} each and {b} pens at ${q} each. How many dollars does {who} spend?",
            {"notebooks": a, "notebook_price": p, "pens": b, "pen_price": q},
            [("notebook_cost", "notebooks * notebook_price"), ("pen_cost", "pens * pen_price"),
             ("total", "notebook_cost + pen_cost")])


def _change(rng: random.Random, s: int) -> Template:
    who, a, p = rng.choice(_NAMES), rng.randint(2, 9), rng.randint(2, 15) * s
    bill = (a * p // (10 * s) + 1 + rng.randint(0, 3)) * 10 * s
    return (f"{who} buys {a} tickets at ${p} each and pays with ${bill}. How many dollars of change does {who} get?",
            {"tickets": a, "price": p, "paid": bill}, [("cost", "tickets * price"), ("change", "paid - cost")])


def _production(rng: random.Random, s: int) -> Template:
    r, h, d = rng.randint(5, 60) * s, rng.randint(2, 12), rng.randint(2, 30)
    return (f"A machine makes {r} widgets per hour. It runs {h} hours a day for {d} days. How many widgets does it "
            "make?", {"rate": r, "hours": h, "days": d}, [("per_day", "rate * hours"), ("total", "per_day * days")])


def _teams(rng: random.Random, s: int) -> Template:
    boys, girls, k = rng.randint(10, 90) * s, rng.randint(10, 90) * s, rng.randint(3, 9)
    return (f"A school has {boys} boys and {girls} girls. They are put into teams of {k}. How many students are left "
            "without a team?", {"boys": boys, "girls": girls, "team": k},
            [("students", "boys + girls"), ("left", "students % team")])


def _sale(rng: random.Random, s: int) -> Template:
    price, pct, n = rng.randint(2, 30) * 20 * s, rng.choice(_PERCENTS), rng.randint(2, 6)
    return (f"A jacket costs ${price}. It is on sale for {pct}% off. How many dollars do {n} jackets cost on sale?",
            {"price": price, "percent": pct, "count": n},
            [("discount", "price * percent // 100"), ("sale_price", "price - discount"),
             ("total", "sale_price * count")])


def _ages(rng: random.Random, s: int) -> Template:
    a, k, y = rng.choice(_NAMES), rng.randint(2, 5), rng.randint(2, 20)
    young = rng.randint(3, 15)
    return (f"{a}'s mother is {k} times as old as {a}. {a} is {young} years old. How old will {a}'s mother be in {y} "
            "years?", {"age": young, "times": k, "years": y}, [("mother", "age * times"), ("later", "mother + years")])


def _rope(rng: random.Random, s: int) -> Template:
    m, c, keep = rng.randint(2, 40) * s, rng.choice((20, 25, 50)), rng.randint(1, 3)
    return (f"A rope is {m} meters long. It is cut into pieces of {c} centimeters and {keep} pieces are kept. How many "
            "pieces are given away?", {"meters": m, "piece_cm": c, "kept": keep},
            [("centimeters", "meters * 100"), ("pieces", "centimeters // piece_cm"), ("given", "pieces - kept")])


def _savings(rng: random.Random, s: int) -> Template:
    who, w, per = rng.choice(_NAMES), rng.randint(4, 52), rng.randint(5, 50) * s
    spent = rng.randint(1, w * per - 1)
    return (f"{who} saves ${per} every week for {w} weeks and then spends ${spent}. How many dollars are left?",
            {"weekly": per, "weeks": w, "spent": spent}, [("saved", "weekly * weeks"), ("left", "saved - spent")])


def _trip(rng: random.Random, s: int) -> Template:
    v, t, u, t2 = rng.randint(30, 120) * s, rng.randint(2, 6), rng.randint(30, 120) * s, rng.randint(2, 6)
    return (f"A car drives at {v} km per hour for {t} hours and then at {u} km per hour for {t2} hours. How many "
            "kilometers does it drive?", {"speed1": v, "hours1": t, "speed2": u, "hours2": t2},
            [("first", "speed1 * hours1"), ("second", "speed2 * hours2"), ("total", "first + second")])


def _candies(rng: random.Random, s: int) -> Template:
    who, k, f, more = rng.choice(_NAMES), rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 50) * s
    have = k * f + rng.randint(1, 99) * s
    return (f"{who} has {have} candies, gives {k} to each of {f} friends, and then buys {more} more. How many candies "
            f"does {who} have now?", {"have": have, "each": k, "friends": f, "bought": more},
            [("given", "each * friends"), ("left", "have - given"), ("now", "left + bought")])


def _average(rng: random.Random, s: int) -> Template:
    mean, d1, d2 = rng.randint(40, 90) * s, rng.randint(0, 9) * s, rng.randint(0, 9) * s
    a, b, c = mean - d1, mean + d2, mean + d1 - d2
    return (f"Three boxes weigh {a} kg, {b} kg and {c} kg. What is their average weight in kg?",
            {"a": a, "b": b, "c": c}, [("total", "a + b + c"), ("average", "total // 3")])


def _fence(rng: random.Random, s: int) -> Template:
    length, width, cost = rng.randint(5, 60) * s, rng.randint(5, 60) * s, rng.randint(3, 25)
    return (f"A garden is {length} m long and {width} m wide. Fencing costs ${cost} per meter. How many dollars does "
            "it cost to fence the garden?", {"length": length, "width": width, "cost": cost},
            [("perimeter", "2 * (length + width)"), ("total", "perimeter * cost")])


def _eggs(rng: random.Random, s: int) -> Template:
    per_day, days, box = rng.randint(20, 300) * s, rng.randint(2, 14), rng.choice((6, 10, 12, 30))
    return (f"A farm collects {per_day} eggs a day for {days} days and packs them in boxes of {box}. How many full "
            "boxes does it pack?", {"per_day": per_day, "days": days, "box": box},
            [("eggs", "per_day * days"), ("boxes", "eggs // box")])


def _wages(rng: random.Random, s: int) -> Template:
    who, rate, extra, hours = rng.choice(_NAMES), rng.randint(10, 40) * s, rng.randint(1, 20) * s, rng.randint(41, 70)
    return (f"{who} earns ${rate} per hour for the first 40 hours of a week and ${rate + extra} per hour for every "
            f"hour after that. {who} works {hours} hours this week. How many dollars does {who} earn?",
            {"rate": rate, "overtime_rate": rate + extra, "hours": hours},
            [("regular", "40 * rate"), ("overtime", "(hours - 40) * overtime_rate"), ("total", "regular + overtime")])


def _family(rng: random.Random, s: int) -> Template:
    adult, child, na, nc = rng.randint(8, 40) * s, rng.randint(3, 20) * s, rng.randint(1, 4), rng.randint(1, 5)
    paid = ((adult * na + child * nc) // (50 * s) + 1) * 50 * s
    return (f"Adult tickets cost ${adult} and child tickets cost ${child}. A family of {na} adults and {nc} children "
            f"pays with ${paid}. How many dollars of change do they get?",
            {"adult": adult, "child": child, "adults": na, "children": nc, "paid": paid},
            [("adult_cost", "adult * adults"), ("child_cost", "child * children"),
             ("cost", "adult_cost + child_cost"), ("change", "paid - cost")])


def _store(rng: random.Random, s: int) -> Template:
    stock, pct = rng.randint(5, 50) * 20 * s, rng.choice(_PERCENTS)
    later = rng.randint(0, stock - stock * pct // 100)
    restock = rng.randint(1, 90) * s
    return (f"A store has {stock} apples. It sells {pct}% of them in the morning and {later} in the afternoon, then "
            f"receives {restock} more. How many apples does it have?",
            {"stock": stock, "percent": pct, "afternoon": later, "restock": restock},
            [("morning", "stock * percent // 100"), ("after_morning", "stock - morning"),
             ("after_afternoon", "after_morning - afternoon"), ("total", "after_afternoon + restock")])


TEMPLATES = (_shopping, _change, _production, _teams, _sale, _ages, _rope, _savings, _trip, _candies, _average,
             _fence, _eggs, _wages, _family, _store)


def problem(rng: random.Random, pid: str, difficulty: int) -> Problem:
    template = rng.choice(TEMPLATES)
    question, inputs, steps = template(rng, 10 ** (difficulty - 1))
    # The steps are this module's own fixed expressions over integers, so evaluating them here is safe; doing it
    # from the same text as the program keeps the answer and the program from ever disagreeing.
    env: dict[str, int] = dict(inputs)
    for name, expression in steps:
        env[name] = eval(expression, {"__builtins__": {}}, env)  # noqa: S307
    lines = [f"{k} = {v}" for k, v in inputs.items()] + [f"{k} = {e}" for k, e in steps] + [f"print({steps[-1][0]})"]
    return Problem(id=pid, suite="gsm", question=question, answer=str(env[steps[-1][0]]), program="\n".join(lines),
                   needs_tool=True, meta={"difficulty": difficulty, "template": template.__name__.lstrip("_"),
                                          "steps": len(steps)})
