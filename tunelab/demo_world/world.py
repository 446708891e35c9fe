"""A small, consistent, generated world: towns, people, companies, products, facts and arithmetic.

Everything is drawn from a fixed seed, so the corpus the demo model is pre-trained on, the labeled
tickets it is tuned on and the probes that test what it knew all describe the same world.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST_NAMES = ["Mira", "Tomas", "Lena", "Oskar", "Ines", "Pavel", "Greta", "Jonah", "Amara", "Felix", "Sana", "Bruno",
               "Yara", "Emil", "Nadia", "Luca", "Hana", "Viktor", "Ada", "Rafael", "Lotte", "Kai", "Elif", "Marek"]
TOWNS = ["Lumen", "Harbridge", "Oakvale", "Stonemere", "Pellar", "Windmoor", "Corran", "Ashby", "Dunmore", "Velsa"]
COUNTRIES = ["Norvania", "Estmark", "Caldera", "Brevia", "Solland"]
COMPANIES = ["Solara", "Nimbus", "Kettleworks", "Brightwave", "Ferro", "Quillon", "Aurex", "Tidewell"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "silver", "orange"]
ANIMALS = ["fox", "owl", "heron", "badger", "otter", "lynx", "crow", "hare"]


@dataclass(frozen=True)
class Product:
    name: str
    kind: str
    maker: str
    price: int
    colour: str
    feature: str


KINDS = {
    "lamp": ("gives warm light for reading", ["flickers when switched on", "will not turn on", "buzzes loudly",
                                              "got very hot after an hour"]),
    "kettle": ("boils water in two minutes", ["leaks from the bottom", "will not switch off", "smells of plastic",
                                              "stopped heating"]),
    "headphones": ("cancel noise on trains", ["lost sound in the left ear", "will not pair with my phone",
                                              "crackle at high volume", "stopped charging"]),
    "blender": ("crushes ice for smoothies", ["makes a grinding noise", "stopped mid blend", "cracked at the jug",
                                              "will not start"]),
    "backpack": ("keeps laptops dry in the rain", ["tore at the strap", "has a broken zip", "arrived with a stain",
                                                   "let water in"]),
    "watch": ("counts steps and tracks sleep", ["shows the wrong time", "will not charge", "has a cracked screen",
                                                "loses its band"]),
    "heater": ("warms a small room quickly", ["trips the fuse", "rattles when running", "shuts off after minutes",
                                              "smells of burning"]),
    "camera": ("takes sharp pictures at night", ["blurs every photo", "drains the battery in an hour",
                                                 "jams the lens", "will not save pictures"]),
}
MODEL_CODES = ["X2", "Mini", "Pro", "S", "One", "Go", "Max", "Lite"]


@dataclass
class World:
    capitals: dict[str, str]  # country -> capital town
    homes: dict[str, str]  # person -> town
    jobs: dict[str, str]  # person -> company
    founded: dict[str, int]  # company -> year
    company_town: dict[str, str]  # company -> town
    products: list[Product]
    pets: dict[str, str]  # person -> animal


def build_world(seed: int = 7) -> World:
    rng = random.Random(seed)
    towns = TOWNS[:]
    rng.shuffle(towns)
    capitals = dict(zip(COUNTRIES, towns))
    homes = {p: rng.choice(TOWNS) for p in FIRST_NAMES}
    jobs = {p: rng.choice(COMPANIES) for p in FIRST_NAMES}
    founded = {c: rng.randint(1890, 2015) for c in COMPANIES}
    company_town = {c: rng.choice(TOWNS) for c in COMPANIES}
    products = []
    for kind, (feature, _) in KINDS.items():
        makers = rng.sample(COMPANIES, 3)
        for maker in makers:
            code = rng.choice(MODEL_CODES)
            name = f"{maker} {kind.capitalize()} {code}"
            products.append(Product(name, kind, maker, rng.randint(2, 40) * 5, rng.choice(COLOURS), feature))
    pets = {p: rng.choice(ANIMALS) for p in FIRST_NAMES}
    return World(capitals, homes, jobs, founded, company_town, products, pets)


def facts(w: World) -> list[tuple[str, str]]:
    """(prompt, answer) facts of the world: the probes, and the sentences of the corpus that teach them."""
    out = [(f"The capital of {c} is", t) for c, t in w.capitals.items()]
    out += [(f"{p} lives in", t) for p, t in w.homes.items()]
    out += [(f"{p} works at", c) for p, c in w.jobs.items()]
    out += [(f"{c} was founded in", str(y)) for c, y in w.founded.items()]
    out += [(f"The {p.name} is made by", p.maker) for p in w.products]
    out += [(f"The {p.name} costs", f"{p.price} crowns") for p in w.products]
    return out


def arithmetic(rng: random.Random, n: int) -> list[tuple[str, str]]:
    ops = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]
    out = []
    for _ in range(n):
        word, fn = rng.choice(ops)
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        if word == "minus" and b > a:
            a, b = b, a
        out.append((f"{a} {word} {b} is", str(fn(a, b))))
    return out
