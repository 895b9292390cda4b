"""What a trial reports, kept free of torch so that the search driver can read reports without importing it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Report = Callable[[dict[str, Any]], None]

# Key of the final report; reports without it are rung reports (a pruned trial never sends it).
FINISHED = "finished"
# Also in the final report: where the trial trained, e.g. "cuda:0 NVIDIA H200 (CUDA_VISIBLE_DEVICES=0)" or "cpu"
# (``trials.run.device_label``); the search tags the trial's MLflow run with it (``mps.device``).
DEVICE = "device"
# Also in the final report of a trial whose mixers ran on CUDA: the path they took, ``fused`` (mamba-ssm's kernels) or
# ``torch: <why>`` (``trials.models.fused.kernel_label``); the search tags the run with it (``mps.kernel``).
KERNEL = "kernel"
