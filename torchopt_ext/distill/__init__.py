"""Dataset distillation: learn synthetic points, labels and per-step learning rates.

The mathematics: docs/design.md#dataset-distillation; the user guide: docs/DISTILL.md.
"""
from torchopt_ext.distill.config import DistillConfig, DistillError
from torchopt_ext.distill.distill import DistilledSet, distill, distill_batch, distill_restarts
from torchopt_ext.distill.evaluate import evaluate
from torchopt_ext.distill.io import load_distilled, save_distilled

__all__ = ["DistillConfig", "DistillError", "DistilledSet", "distill", "distill_batch", "distill_restarts", "evaluate",
           "save_distilled", "load_distilled"]
