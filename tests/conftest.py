"""Test set-up: Triton under its interpreter on CPU, per-test seeds, dtype-derived tolerances."""

import os

# Must precede any import of triton. A GPU run (pytest -m gpu) sets TRITON_INTERPRET=0 itself.
os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Fresh data each run; EMALORA_TEST_SEED=<n> replays a run (the seed is printed in the header).
RUN_SEED = int(os.environ.get("EMALORA_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"emalora-fast test seed: EMALORA_TEST_SEED={RUN_SEED}"


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Seeds torch from the run seed and the test id; returns the seed."""
    s = (zlib.crc32(request.node.nodeid.encode()) ^ RUN_SEED) % 2**31
    torch.manual_seed(s)
    random.seed(s)
    return s


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (and TRITON_INTERPRET unset)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
