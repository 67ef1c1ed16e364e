"""Fine-tuning: train on each task in turn with plain cross-entropy, nothing against forgetting.

The lower bound of every continual-learning comparison (called "Naive" in Avalanche, "SGD" or
"Finetune" in Mammoth and PyCIL). All of its behaviour is ``ClassifierStrategy``'s.
"""
from cl_bench.strategies.base import ClassifierStrategy


class Finetune(ClassifierStrategy):
    description = "sequential fine-tuning, no protection against forgetting (lower bound)"
