"""The tuning strategies: which parameters train, which are added, and how the result is saved."""

from tunelab.strategies.model import ParamCount, TrainModel, count_parameters
from tunelab.strategies.table import STRATEGIES, prepare_strategy

__all__ = ["STRATEGIES", "ParamCount", "TrainModel", "count_parameters", "prepare_strategy"]
