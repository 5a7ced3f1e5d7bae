"""Library queries match a size on the count the entry was built for (mfnoise/library/index.py)."""

from __future__ import annotations

from mfnoise.library import index


def _folder(tmp_path):
    entries = [
        {"name": "a-blt4", "family": "blt", "optimizer_family": "blt", "n": 100, "buffers": 2, "requested_buffers": 4},
        {"name": "a-blt2", "family": "blt", "optimizer_family": "blt", "n": 100, "buffers": 2, "requested_buffers": 2},
        {"name": "old-blt3", "family": "blt", "optimizer_family": "blt", "n": 100, "buffers": 3},  # no request
    ]
    idx = index.empty_index()
    idx["strategies"] = entries
    index.write_index(idx, tmp_path)
    return tmp_path


def test_buffers_match_the_requested_count(tmp_path):
    folder = _folder(tmp_path)
    assert [e["name"] for e in index.entries(folder, buffers=4)] == ["a-blt4"]
    assert [e["name"] for e in index.entries(folder, buffers=2)] == ["a-blt2"]
    assert [e["name"] for e in index.entries(folder, buffers=3)] == ["old-blt3"]  # stored count
    assert sorted(e["name"] for e in index.entries(folder, kept_buffers=2)) == ["a-blt2", "a-blt4"]
    assert [e["name"] for e in index.entries(folder, requested_buffers=4)] == ["a-blt4"]
