"""MEAL-style ensemble distillation from cached teacher outputs.

The library behind the `stages/` entry points: datasets, the model zoo, replayable augmentation,
the teacher cache, distillation losses and the training loops.
"""

__version__ = "0.1.0"
