"""Customer-support tickets with two targets: a concise summary, and the intent and urgency."""

from __future__ import annotations

import random
from dataclasses import dataclass

from tunelab.demo_world.world import KINDS, World

INTENTS = {
    "refund": ["Please refund me.", "I want my money back.", "Can I get a refund?", "Refund it, please."],
    "replacement": ["Could you send a new one?", "Please replace it.", "I would like a replacement.",
                    "Send me a working one, please."],
    "repair": ["Can someone repair it?", "Where can I get it fixed?", "Please arrange a repair.",
               "I just want it repaired."],
    "help": ["How do I fix this myself?", "Is there something I can try?", "What should I do?",
             "Any advice on how to fix it?"],
}
URGENCY = {
    "high": ["This is urgent.", "I need this sorted today.", "It is a gift for tomorrow, please hurry.",
             "Please answer as soon as possible!"],
    "medium": ["", "I would like an answer this week.", ""],
    "low": ["No rush.", "Whenever you have time.", "It can wait a few days."],
}
GREETINGS = ["Hi,", "Hello,", "Dear support,", "Hey there,", "", "Good morning,"]
TRIED = ["I already tried restarting it.", "I checked the manual.", "I tried another socket.", "I cleaned it.", "", ""]
ANGRY = ["This is unacceptable.", "I am very disappointed.", "Really not happy about this."]
POLITE = ["Thank you so much.", "Thanks in advance.", "Many thanks for your help."]
OPENINGS = ["I bought the {product} {days} days ago and it {problem}.",
            "My {product} (order {order}) {problem}.",
            "Since yesterday my new {product} {problem}.",
            "The {product} I ordered last month {problem}.",
            "I have a problem: the {product} {problem}."]


@dataclass
class Ticket:
    text: str
    summary: str
    intent: str
    urgency: str
    customer: str
    product: str


def make_ticket(w: World, rng: random.Random) -> Ticket:
    customer = rng.choice(list(w.homes))
    pr = rng.choice(w.products)
    problem = rng.choice(KINDS[pr.kind][1])
    intent = rng.choice(list(INTENTS))
    urgency = rng.choices(["high", "medium", "low"], weights=[3, 4, 3])[0]
    tone = rng.choice(["angry", "neutral", "polite"])
    body = [OPENINGS[rng.randrange(len(OPENINGS))].format(product=pr.name, days=rng.randint(2, 40),
                                                          order=rng.randint(10000, 99999), problem=problem)]
    body += [t for t in (rng.choice(TRIED), rng.choice(ANGRY) if tone == "angry" else "") if t]
    request = [rng.choice(INTENTS[intent]), rng.choice(URGENCY[urgency])]
    rng.shuffle(request)
    body += [t for t in request if t]
    if tone == "polite":
        body.append(rng.choice(POLITE))
    greeting = rng.choice(GREETINGS)
    text = " ".join(t for t in [greeting, *body, customer if rng.random() < 0.7 else ""] if t)
    wants = {"refund": "wants a refund", "replacement": "wants a replacement", "repair": "wants a repair",
             "help": "asks how to fix it"}[intent]
    summary = f"{'URGENT: ' if urgency == 'high' else ''}{pr.name} {problem}; {wants}."
    return Ticket(text, summary, intent, urgency, customer, pr.name)


def tickets(w: World, n: int, seed: int) -> list[Ticket]:
    rng = random.Random(seed)
    return [make_ticket(w, rng) for _ in range(n)]
