"""Stock BentoML for bench/serving.py: the same MLflow model behind one batchable API, nothing of this project's
(no validation, no V2, no /invocations formats). `bentoml serve stock_bento:Stock` with BENCH_MODEL (a model
folder), BENCH_WORKERS and BENCH_MAX_BATCH_SIZE set; BentoML's default latency budget, as ours uses."""

from __future__ import annotations

import os
from typing import Any

import bentoml


@bentoml.service(name="stock", workers=int(os.environ.get("BENCH_WORKERS", "1")))
class Stock:
    def __init__(self) -> None:
        import mlflow

        self.model = mlflow.pyfunc.load_model(os.environ["BENCH_MODEL"])

    @bentoml.api(batchable=True, max_batch_size=int(os.environ.get("BENCH_MAX_BATCH_SIZE", "64")))
    def predict(self, rows: list[dict[str, Any]]) -> list[Any]:
        import pandas as pd

        return self.model.predict(pd.DataFrame.from_records(rows)).tolist()
