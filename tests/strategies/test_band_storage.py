"""Banded storage by columns and by rows, against the dense matrix built entry by entry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mfnoise.strategies import band_storage

from conftest import FEW


def _random(n: int, bands: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(columns, C) with columns[t, j] = C[t + j, t], built here entry by entry."""
    rng = np.random.default_rng(seed)
    cols = rng.normal(size=(n, bands))
    c = np.zeros((n, n))
    for t in range(n):
        for j in range(bands):
            if t + j < n:
                c[t + j, t] = cols[t, j]
            else:
                cols[t, j] = 0.0
    return cols, c


@FEW
@given(n=st.integers(1, 12), bands=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_conversions_agree_with_the_matrix(n, bands, seed):
    bands = min(bands, n)
    cols, c = _random(n, bands, seed)
    rows = band_storage.rows_from_columns(cols)
    for t in range(n):
        for j in range(bands):
            assert rows[t, j] == (c[t, t - j] if j <= t else 0.0)
    np.testing.assert_array_equal(band_storage.columns_from_rows(rows), cols)
    np.testing.assert_array_equal(band_storage.dense_from_columns(cols), c)
    np.testing.assert_array_equal(band_storage.columns_from_dense(c, bands), cols)
    used = [j for j in range(bands) if np.any(cols[:, j] != 0)]
    assert band_storage.effective_bands(cols) == (used[-1] + 1 if used else 1)


def test_columns_from_dense_refuses_bad_bands():
    with pytest.raises(ValueError, match="bands=0"):
        band_storage.columns_from_dense(np.eye(3), 0)
    with pytest.raises(ValueError, match="bands=4"):
        band_storage.columns_from_dense(np.eye(3), 4)
