"""Memory plan of a training configuration before launch (`python -m ar2diff.plan`)."""

from ar2diff.model.params import ModelShape
from ar2diff.plan.memory import MemoryPlan, TrainShape, plan_memory

__all__ = ["MemoryPlan", "ModelShape", "TrainShape", "plan_memory"]
