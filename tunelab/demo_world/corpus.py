"""The pre-training corpus of the demo model: facts of the world in varied wording, arithmetic,
everyday stories and text about products and customers (no ticket summaries: that is the task)."""

from __future__ import annotations

import random

from tunelab.demo_world.world import KINDS, World, arithmetic

WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "grey", "bright", "foggy"]
ERRANDS = ["bought bread and milk", "visited a friend", "read a book in the park", "cooked soup for dinner",
           "fixed a bicycle", "wrote a letter", "planted tomatoes", "painted the fence", "went for a long walk"]


def fact_sentences(w: World, rng: random.Random) -> list[str]:
    s = []
    for c, t in w.capitals.items():
        s += [f"The capital of {c} is {t}.", f"{t} is the capital of {c}.", f"In {c}, the capital city is {t}."]
    for p, t in w.homes.items():
        s += [f"{p} lives in {t}.", f"{p} has lived in {t} for many years.", f"{p} lives in {t} with a pet {w.pets[p]}."]
    for p, c in w.jobs.items():
        s += [f"{p} works at {c}.", f"{p} has a job at {c}.", f"Every morning {p} goes to work at {c}."]
    for c, y in w.founded.items():
        s += [f"{c} was founded in {y}.", f"{c} is based in {w.company_town[c]}.", f"In {y}, {c} was founded in "
              f"{w.company_town[c]}."]
    for pr in w.products:
        s += [f"The {pr.name} is made by {pr.maker}.", f"{pr.maker} makes the {pr.name}.",
              f"The {pr.name} costs {pr.price} crowns.", f"The {pr.name} {pr.feature}.",
              f"The {pr.name} comes in {pr.colour}.", f"The {pr.name} is a {pr.kind} made by {pr.maker}."]
    rng.shuffle(s)
    return s


def arithmetic_sentences(rng: random.Random, n: int) -> list[str]:
    out = []
    for prompt, answer in arithmetic(rng, n):
        form = rng.randrange(3)
        if form == 0:
            out.append(f"{prompt} {answer}.")
        elif form == 1:
            out.append(f"What is {prompt.removesuffix(' is')}? It is {answer}.")
        else:
            out.append(f"We know that {prompt} {answer}.")
    return out


def story(w: World, rng: random.Random) -> str:
    p = rng.choice(list(w.homes))
    town, weather = w.homes[p], rng.choice(WEATHER)
    pr = rng.choice(w.products)
    friend = rng.choice([q for q in w.homes if q != p])
    lines = [f"It was a {weather} day in {town}.", f"{p} {rng.choice(ERRANDS)}.",
             f"Later {p} met {friend}, who works at {w.jobs[friend]}.",
             f"They talked about the {pr.name}, which {pr.feature}.",
             f"{friend} said it costs {pr.price} crowns.", f"In the evening {p} fed the {w.pets[p]} and went to bed."]
    k = rng.randint(3, len(lines))
    return " ".join(lines[:k])


def customer_text(w: World, rng: random.Random) -> str:
    """Reviews and shop talk about the products (problems mentioned in passing, never summarised)."""
    pr = rng.choice(w.products)
    p = rng.choice(list(w.homes))
    problem = rng.choice(KINDS[pr.kind][1])
    form = rng.randrange(4)
    if form == 0:
        return f"{p} bought the {pr.name} in {w.homes[p]}. It {pr.feature}, and {p} likes the {pr.colour} colour."
    if form == 1:
        return (f"Review of the {pr.name}: it {pr.feature}. After a month mine {problem}, but the shop helped me. "
                f"Three stars. Written by {p}.")
    if form == 2:
        return (f"At the shop in {w.company_town[pr.maker]}, {p} asked about the {pr.name}. The seller said it costs "
                f"{pr.price} crowns and is made by {pr.maker}.")
    return f"{pr.maker} makes many products. The {pr.name} is one of them, a {pr.kind} that {pr.feature}."


def corpus(w: World, seed: int, n_stories: int = 6000, n_customer: int = 6000, n_arith: int = 6000,
           fact_repeats: int = 12) -> list[str]:
    """Documents of the corpus (shuffled): facts repeated in varied order, arithmetic, stories, customer text."""
    rng = random.Random(seed)
    docs = []
    for _ in range(fact_repeats):
        sentences = fact_sentences(w, rng)
        docs += [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)]
    arith = arithmetic_sentences(rng, n_arith)
    docs += [" ".join(arith[i : i + 4]) for i in range(0, len(arith), 4)]
    docs += [story(w, rng) for _ in range(n_stories)]
    docs += [customer_text(w, rng) for _ in range(n_customer)]
    rng.shuffle(docs)
    return docs
