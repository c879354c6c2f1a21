"""Shared test set-up: real MNIST comes from the project's data-location setting (MNISTLAB_DATA).

When MNISTLAB_DATA is not set, the offline copy beside the checkout (../shared/datasets) is used.
Tests that need real data fail, never skip, when it is missing.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if not os.environ.get("MNISTLAB_DATA") and (REPO.parent / "shared" / "datasets").is_dir():
    os.environ["MNISTLAB_DATA"] = str(REPO.parent / "shared" / "datasets")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder that holds real MNIST; a test that needs it fails loudly if it is absent."""
    from mnistlab import data
    where = data.locate("mnist", os.environ.get("MNISTLAB_DATA"))
    if where is None:
        pytest.fail("real MNIST not found: set MNISTLAB_DATA to a folder holding mnist/ "
                    "(e.g. ../shared/datasets)")
    return Path(os.environ["MNISTLAB_DATA"])
