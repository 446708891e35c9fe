"""The full demo's task 2 (a ticket's intent, 4 labels, at 3x the steps): slow."""

import pytest

from tests.demo_tasks import by_strategy, demo_inputs
from tunelab.demo import intent_task


@pytest.mark.slow
def test_demo_task_2_separates_the_strategies(tmp_path):
    intent = by_strategy(intent_task(*demo_inputs(tmp_path)))
    # full tuning learns the 4 intents, prompting stays near chance (0.25)
    assert intent["full"]["accuracy"] > 0.9 > 0.4 > max(intent["zero-shot"]["accuracy"], intent["few-shot"]["accuracy"])
    assert intent["lora"]["accuracy"] > intent["few-shot"]["accuracy"]
