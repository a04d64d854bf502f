"""Kept for older imports: the rollout report lives in `ml_serving.rollout.report`."""

from ml_serving.rollout.report import limit_series, read_log, stage_table, write_picture

__all__ = ["limit_series", "read_log", "stage_table", "write_picture"]
