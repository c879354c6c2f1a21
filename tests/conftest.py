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


# --- A served model: the API tests and the browser test share one small run and one server -------

@pytest.fixture(scope="session")
def served_run(mnist_dir, tmp_path_factory) -> Path:
    """seed003 trained for one epoch on 6,000 real digits (about 90% test accuracy): enough to read
    a clearly drawn digit, and a few seconds of training on one thread."""
    from mnistlab.config import TrainConfig
    from mnistlab.train import fit
    run = tmp_path_factory.mktemp("served") / "run"
    fit(TrainConfig(model="seed003", epochs=1, limit_train=6000, val_split=0, threads=1, seed=0),
        out=run, data_dir=mnist_dir, progress=False)
    return run


@pytest.fixture(scope="session")
def live_server(served_run):
    """`mnistlab serve RUN` in its own process on a free loopback port, as a user starts it; yields
    its base URL and stops it at the end."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = served_run.parent / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mnistlab", "serve", str(served_run), "--port", str(port),
                                   "--quiet"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"`mnistlab serve` did not start:\n{log.read_text()}")
        time.sleep(0.2)
    yield url
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
