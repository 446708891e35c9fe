"""A renderer of the part of Go's text/template language that Ollama's chat templates use, so that a Modelfile's
TEMPLATE is checked against the chat template without Ollama (which no Python registry ships).

Kept to Go's semantics (https://pkg.go.dev/text/template): `{{- ` and ` -}}` trim the adjacent text's white space;
`if` / `else if` / `else` / `end`; `range` over a list (the dot becomes each element; `range $i, $m := ...` binds
variables); fields `.Name` (and `$.Name`, `$var.Name`); string and integer literals; the functions eq, ne, not, and,
or, index, len, slice; parentheses. Truth is Go's: false, 0, "", an empty list or map, and nil are false. Anything
else raises ValueError naming it, rather than rendering something Go would not.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|-?\d+|:=|,|[$.\w]+[.\w]*)')


def _lex(source: str) -> list[tuple[str, str]]:
    """('text', s) and ('action', body) items, trim markers applied to the text around them."""
    items: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for match in _ACTION.finditer(source):
        text = source[pos:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        items.append(("text", text))
        items.append(("action", match.group(2).strip()))
        pos, trim_next = match.end(), bool(match.group(3))
    tail = source[pos:]
    items.append(("text", tail.lstrip() if trim_next else tail))
    return items


def _truth(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, (list, dict, tuple)) and not value)


def _field(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        if name in value:
            return value[name]
        lowered = {k.lower(): v for k, v in value.items()}  # Ollama's Go structs: .Role is the JSON's "role"
        if name.lower() in lowered:
            return lowered[name.lower()]
    raise ValueError(f"template field .{name} does not exist on {value!r}")


FUNCTIONS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
    "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]), "or": lambda *a: next((x for x in a if _truth(x)),
                                                                                             a[-1]),
    "index": lambda a, *i: _index(a, i), "len": len, "slice": lambda a, *i: a[slice(*i)],
}


def _index(value: Any, keys: tuple[Any, ...]) -> Any:
    for key in keys:
        value = value[key]
    return value


class _Evaluator:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.variables: dict[str, Any] = {"$": root}

    def value(self, token: str, dot: Any) -> Any:
        if token.startswith('"'):
            return bytes(token[1:-1], "utf-8").decode("unicode_escape")
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if token in ("true", "false"):
            return token == "true"
        if token == ".":
            return dot
        head, *fields = token.split(".")
        value = dot if head == "" else self.variables[head] if head.startswith("$") else None
        if head and not head.startswith("$"):
            raise ValueError(f"unknown template word '{token}'")
        for name in fields:
            value = _field(value, name)
        return value

    def expression(self, tokens: list[str], dot: Any) -> Any:
        """A command: a function and its arguments, or one operand; parentheses nest."""
        args, i = [], 0
        while i < len(tokens):
            if tokens[i] == "(":
                depth, j = 1, i + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                    j += 1
                value = self.expression(tokens[i + 1:j - 1], dot)
                while j < len(tokens) and tokens[j].startswith("."):  # (index .Messages 0).Role
                    for name in tokens[j].split(".")[1:]:
                        value = _field(value, name)
                    j += 1
                args.append(("value", value))
                i = j
            else:
                args.append(("word", tokens[i]))
                i += 1
        kind, first = args[0]
        if kind == "word" and first in FUNCTIONS:
            return FUNCTIONS[first](*[v if k == "value" else self.value(v, dot) for k, v in args[1:]])
        if len(args) != 1:
            raise ValueError(f"cannot evaluate {tokens}: only eq, ne, not, and, or, index, len, slice are known")
        return first if kind == "value" else self.value(first, dot)


def _tokens(body: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(body.rstrip()):
        match = _TOKEN.match(body, pos)
        if not match:
            raise ValueError(f"cannot read the template action {{{{ {body} }}}}")
        tokens.append(match.group(1))
        pos = match.end()
    return tokens


def _block(items: list[tuple[str, str]], start: int) -> tuple[list[tuple[list[str] | None, int, int]], int]:
    """The branches of the if/range opened at items[start]: (condition tokens or None for else, first, end) each,
    and the index of its `end`."""
    branches, depth, begin = [], 0, start + 1
    condition: list[str] | None = _tokens(items[start][1])[1:]
    for i in range(start + 1, len(items)):
        kind, body = items[i]
        if kind != "action":
            continue
        word = body.split()[0] if body else ""
        if word in ("if", "range", "with"):
            depth += 1
        elif word == "end" and depth:
            depth -= 1
        elif depth == 0 and word in ("else", "end"):
            branches.append((condition, begin, i))
            if word == "end":
                return branches, i
            condition = _tokens(body)[2:] if body.split()[1:2] == ["if"] else None
            begin = i + 1
    raise ValueError("a template block has no {{ end }}")


def _render(items: list[tuple[str, str]], lo: int, hi: int, ev: _Evaluator, dot: Any, out: list[str]) -> None:
    i = lo
    while i < hi:
        kind, body = items[i]
        if kind == "text":
            out.append(body)
            i += 1
            continue
        word = body.split()[0] if body else ""
        if word == "if":
            branches, end = _block(items, i)
            for condition, first, last in branches:
                if condition is None or _truth(ev.expression(condition, dot)):
                    _render(items, first, last, ev, dot, out)
                    break
            i = end + 1
        elif word == "range":
            branches, end = _block(items, i)
            _range(items, branches, ev, dot, out)
            i = end + 1
        elif word.startswith("$") and ":=" in body:
            name, expression = body.split(":=", 1)
            ev.variables[name.strip()] = ev.expression(_tokens(expression), dot)
            i += 1
        elif word.startswith("/*"):
            i += 1
        else:
            value = ev.expression(_tokens(body), dot)
            out.append("" if value is None else str(value))
            i += 1


def _range(items: list[tuple[str, str]], branches: list[Any], ev: _Evaluator, dot: Any, out: list[str]) -> None:
    tokens, first, last = branches[0]
    names: list[str] = []
    if ":=" in tokens:
        names = [t for t in tokens[: tokens.index(":=")] if t != ","]
        tokens = tokens[tokens.index(":=") + 1:]
    values = ev.expression(tokens, dot) or []
    for index, element in enumerate(values):
        if len(names) == 2:
            ev.variables[names[0]], ev.variables[names[1]] = index, element
        elif names:
            ev.variables[names[0]] = element
        _render(items, first, last, ev, element, out)
    if not values and len(branches) > 1:
        _render(items, branches[1][1], branches[1][2], ev, dot, out)


def render_go_template(source: str, data: dict[str, Any]) -> str:
    """`source` executed on `data` as Go's text/template would."""
    items = _lex(source)
    out: list[str] = []
    _render(items, 0, len(items), _Evaluator(data), data, out)
    return "".join(out)
