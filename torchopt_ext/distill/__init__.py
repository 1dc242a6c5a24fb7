"""Dataset distillation (DESIGN.md §4): learn synthetic points, labels and per-step learning rates."""
from torchopt_ext.distill.config import DistillConfig, DistillError
from torchopt_ext.distill.distill import DistilledSet, distill, distill_batch, distill_restarts
from torchopt_ext.distill.evaluate import evaluate
from torchopt_ext.distill.io import load_distilled, save_distilled

__all__ = ["DistillConfig", "DistillError", "DistilledSet", "distill", "distill_batch", "distill_restarts", "evaluate",
           "save_distilled", "load_distilled"]
