"""Shared test helpers (not tests, not fixtures): importable as ``helpers`` because
pyproject.toml's ``[tool.pytest.ini_options] pythonpath = ["tests"]`` puts tests/ on sys.path.

config       compose the Hydra config `mha-train` would run; common overrides
corpus       a toy parallel-text corpus on disk
runs         environment for CLI subprocesses; reading a run's CSV log
distributed  spawn a small gloo world with a (dp, tp) device mesh
wandb_offline  read wandb's offline run files back (no sync, no mocks)
gradients    a callback recording gradients around clipping; the value-clipping assertion
"""
