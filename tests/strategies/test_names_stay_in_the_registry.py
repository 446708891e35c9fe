"""No module outside tunelab/strategies/ compares a strategy's name: every other stage asks the registry's
`TuningStrategy` objects (their fields, their `Addition`) instead of deciding by name. Read statically, as
tests/test_imports.py reads imports: a comparison, membership test or match case against one of the registry's names
is a strategy fact written outside the registry."""

from __future__ import annotations

import ast
from pathlib import Path

from tunelab.strategies.registry import STRATEGIES

PACKAGE = Path(__file__).resolve().parents[2] / "tunelab"


def _strings(node: ast.AST) -> set[str]:
    """The string constants a comparison operand holds: itself, or the items of a literal tuple, list or set."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def name_comparisons(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, code) of each comparison (==, !=, in, not in, is), or match case, of a value against one of `names`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        else:
            continue
        if set().union(*map(_strings, operands)) & names:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_scan_finds_each_form_of_name_comparison():
    names = set(STRATEGIES)
    # the line config.py held before the prefix refusal moved into the soft prompt's Addition
    old_config = ('if (self.train.activation_checkpointing and self.strategy.name == "soft_prompt"\n'
                  '        and self.strategy.soft_prompt.method == "prefix_tuning"):\n    pass\n')
    assert name_comparisons(old_config, names) == [(1, "self.strategy.name == 'soft_prompt'")]
    assert len(name_comparisons("a = x in ('lora', 'ia3')\nb = 'full' != y\nc = z is 'freeze'", names)) == 3
    assert len(name_comparisons("match s:\n    case 'prompt_lm':\n        pass\n", names)) == 1
    # naming a strategy is not comparing one: dict keys, calls, assignments and other strings pass
    assert name_comparisons("d = {'lora': 1}\nd.get('full')\np = 'prompt_lm'\nq = v == 'dora'", names) == []


def test_no_module_outside_strategies_compares_a_strategy_name():
    names = set(STRATEGIES)
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {code}"
             for path in sorted(PACKAGE.rglob("*.py")) if "strategies" not in path.relative_to(PACKAGE).parts
             for line, code in name_comparisons(path.read_text(encoding="utf-8"), names)]
    assert not found, ("strategy names compared outside the registry (ask the TuningStrategy's fields instead): "
                       + "; ".join(found))
