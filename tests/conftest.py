"""Shared test set-up: Triton runs under its interpreter on CPU; every test gets its own seed."""

import os

# Before anything imports triton: the kernels then run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    """Seed torch from the test id (salted by EMALORA_TEST_SEED): different data per test,
    reproducible per test; set EMALORA_TEST_SEED to draw a fresh set."""
    salt = os.environ.get("EMALORA_TEST_SEED", "")
    torch.manual_seed(zlib.crc32((salt + request.node.nodeid).encode()))
