"""Evaluation protocol (train fresh networks on a set, test on real data) and baselines."""
from pydistill_ext.evaluation.baselines import (BASELINES, full_data, herding, herding_indices,
                                                make_baseline, random_subset)
from pydistill_ext.evaluation.protocol import (EvalConfig, EvalResult, evaluate_models,
                                               evaluate_synset, test_accuracy, train_network)

__all__ = ["BASELINES", "EvalConfig", "EvalResult", "evaluate_models", "evaluate_synset",
           "full_data", "herding", "herding_indices", "make_baseline", "random_subset",
           "test_accuracy", "train_network"]
