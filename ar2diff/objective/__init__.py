"""The TiDAR objective: pure loss functions (`losses`), the rank's share under sequence parallelism (`sharded`,
which imports only the pure functions) and `TidarObjective`, the module DeepSpeed wraps (`module`)."""

from ar2diff.objective.losses import (
    DiffTarget,
    LossTerms,
    TidarOutput,
    aligned_ce,
    ar_loss,
    ar_targets,
    diff_targets,
    teacher_rows,
    tidar_loss,
)
from ar2diff.objective.module import TidarObjective

__all__ = ["DiffTarget", "LossTerms", "TidarObjective", "TidarOutput", "aligned_ce", "ar_loss", "ar_targets",
           "diff_targets", "teacher_rows", "tidar_loss"]
