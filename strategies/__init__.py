"""The precomputed strategy library's data: ``index.json`` and one ``.npz`` strategy file per entry.

Installed as the package data ``mfnoise.library.data`` (pyproject.toml maps it to this folder), so
an installed mfnoise finds it without a symlink; ``mfnoise/library`` reads it. Not code.
"""
