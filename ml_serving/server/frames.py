"""The request's columns as the DataFrame MLServer's PandasCodec makes, built without a Series per column.

PandasCodec builds one `pd.Series` per input and then a DataFrame aligning them by index, a large share of a
small model's time (bench/profile-front.txt). The frame here is the same (dtypes included, tests/test_frames.py
compares them); any input it does not cover is left to PandasCodec.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlserver.codecs import PandasCodec
from mlserver.codecs.numpy import to_dtype
from mlserver.codecs.utils import get_decoded_or_raw
from mlserver.types import Datatype, InferenceRequest


def columns_frame(request: InferenceRequest) -> pd.DataFrame | None:
    """PandasCodec.decode_request(request) once each input is decoded by its own codec; None where that codec
    does more than take the column as it is (JSON-encoded columns, columns of unequal or zero length, more than
    one value a row)."""
    columns: dict[str, Any] = {}
    rows = None
    for tensor in request.inputs:
        if tensor.parameters is not None and tensor.parameters.content_type == PandasCodec.JsonContentType:
            return None
        payload = get_decoded_or_raw(tensor)
        if len(payload) != tensor.shape[0]:  # several values a row: PandasCodec's reshape decides
            return None
        if Datatype(tensor.datatype) == Datatype.BYTES:
            column = payload  # kept as given, as PandasCodec does: pandas infers text or objects
        else:
            if isinstance(payload, np.ndarray):
                payload = payload.reshape(tensor.shape[0], 1).squeeze(axis=1)
            column = np.asarray(payload, dtype=to_dtype(tensor))
            if column.ndim != 1:
                return None
        if rows is None:
            rows = len(column)
        if not rows or len(column) != rows:
            return None
        columns[tensor.name] = column
    return pd.DataFrame(columns) if columns else None
