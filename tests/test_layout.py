"""The test run's import path: no folder of this repository may pass for the PyPI ``kernels`` package."""

import importlib.util
from pathlib import Path


def test_no_repository_folder_is_importable_as_kernels():
    """bitsandbytes imports a top-level ``kernels`` (the PyPI hub package) when it is there; our
    ``kernels/`` and ``tests/kernels/`` must not answer for it (pytest puts only tests/helpers on the path)."""
    spec = importlib.util.find_spec("kernels")
    root = Path(__file__).resolve().parents[1]
    locations = [] if spec is None else [*(spec.submodule_search_locations or []), spec.origin or ""]
    assert not any(str(root) in str(p) for p in locations), locations
