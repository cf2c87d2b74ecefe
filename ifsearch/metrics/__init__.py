"""Evaluation metrics: ScanNet-protocol instance AP and class-agnostic query diagnostics."""

from ifsearch.metrics.diagnostics import instance_diagnostics
from ifsearch.metrics.instance_ap import instance_ap

__all__ = ["instance_ap", "instance_diagnostics"]
