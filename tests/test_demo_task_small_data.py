"""The full demo's task 3 (64 examples, every strategy) and the advisor set against it: slow."""

import pytest

from tests.demo_tasks import by_strategy, demo_inputs
from tunelab.demo import small_data_task


@pytest.mark.slow
def test_demo_task_3_every_strategy_on_64_examples_and_the_advisor_agrees(tmp_path):
    small, advice = small_data_task(*demo_inputs(tmp_path))
    rows = by_strategy(small)
    assert set(rows) == {"zero-shot", "few-shot", "soft_prompt", "lora", "ia3", "freeze", "full", "prompt_lm"}
    assert all(rows[n]["train_flops"] > 0 for n in rows if n not in ("zero-shot", "few-shot"))
    assert advice["agrees"], advice["text"]
