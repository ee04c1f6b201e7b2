"""Shared test set-up.

Tiers (markers, see pyproject.toml): default CPU-fast; ``slow`` (whole notebooks
and the demo on tiny models); ``browser`` (headless chromium); ``gpu`` (CUDA,
skipped with a reason where absent); ``bench`` (only with ``--benchmarks``).

    pytest -q tests                      # what `make test` runs
    pytest -q -m "not slow" tests        # fast tier only
"""

from __future__ import annotations

import os

import pytest

# Tiny models are built once per session into a shared cache (no downloads).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--benchmarks", action="store_true", help="run @pytest.mark.bench tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: benchmarks, run only with --benchmarks")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_bench = pytest.mark.skip(reason="benchmark: run with --benchmarks (make bench)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    cuda = torch.cuda.is_available()
    for item in items:
        if "bench" in item.keywords and not config.getoption("--benchmarks"):
            item.add_marker(skip_bench)
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A session-wide cache folder for tiny models (VLMFIT_CACHE)."""
    path = os.environ.get("VLMFIT_TEST_CACHE") or str(tmp_path_factory.mktemp("vlmfit-cache"))
    os.environ["VLMFIT_CACHE"] = path
    import vlmfit.models.builders as tiny

    tiny.DEFAULT_CACHE = type(tiny.DEFAULT_CACHE)(path)
    return path


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """The bundled shapes dataset, small: 24 SFT and 16 DPO training samples, 12 held out."""
    from vlmfit.data import synth

    out = tmp_path_factory.mktemp("shapes") / "shapes"
    synth.generate(out, seed=0, n_train=24, n_test=12, n_dpo_train=16, n_dpo_test=12)
    return out
