"""Shared, session-scoped fixtures of the qvla_quant tests: a tiny random π0 saved to disk (loaded back through the
adapter, like a user's checkpoint), fixed inputs in the adapter's batch format, and one calibration of it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from qvla_quant.adapters.pi0 import example_batch, tiny_pi0_config


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread, and on a loaded CI machine two OpenMP threads that wait for each other
    at every op made the same calibration 10x slower (measured: 6 s vs 60 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_pi0_dir(tmp_path_factory):
    from transformers import PI0ForConditionalGeneration

    torch.manual_seed(0)
    with one_thread():
        model = PI0ForConditionalGeneration(tiny_pi0_config()).eval()
        path = tmp_path_factory.mktemp("tiny_pi0")
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_batches():
    config = tiny_pi0_config()
    return [example_batch(config, 2, seed=0), example_batch(config, 2, seed=1)]


@pytest.fixture
def tiny_pi0(tiny_pi0_dir):
    """A fresh adapter per test (tests may quantize its model in place)."""
    from qvla_quant.api import load_policy

    return load_policy(tiny_pi0_dir)


@pytest.fixture(scope="session")
def tiny_calibration():
    """Small but complete settings: proxy (8 random projections) for all channels, exact for the top 1% per bit
    and 48 random (channel, bit) pairs; a 4-point clip search keeps the quantizer cheap."""
    from qvla_quant.config import WeightQuantConfig

    return dict(
        exact_fraction=0.01, rank_sample=48, channels_per_pass=16, max_exact_dims=8, n_probes=8,
        weight=WeightQuantConfig(clip_grid=4), progress=False,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_sensitivity(tiny_pi0_dir, tiny_batches, tiny_calibration, tmp_path_factory):
    from qvla_quant import CalibrationConfig, calibrate
    from qvla_quant.api import load_policy

    store = tmp_path_factory.mktemp("tiny_sens")
    config = CalibrationConfig(store_dir=str(store), **tiny_calibration)
    with one_thread():
        return calibrate(load_policy(tiny_pi0_dir), tiny_batches, config), store
