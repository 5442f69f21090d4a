"""Shared pytest setup: CPU thread count, and skip `gpu` tests with a reason when CUDA is absent."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing: nothing GPU can run
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); this machine has no GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
