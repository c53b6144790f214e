"""Shared, session-scoped fixtures: offline data and the trained example models.

Models come from ``findlady_examples.train.trained()``, cached on disk under ``cache_dir()``, so a
warm run loads them in milliseconds. Fixtures hand out shared objects: never mutate a fixture's
model or tensors (copy first; ``state_dict`` values are private clones but shared across tests).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from findlady_core.spec import Spec
from findlady_core.trace import trace_spec
from findlady_core.watermark import WatermarkKey
from findlady_examples import data, models, train

# One torch thread by default: the suite's ops are small, and the service tests run a worker and
# a server beside pytest on two cores, where oversubscribed OpenMP threads spin and run up to
# ~10x slower (FINDLADY_TEST_THREADS=2 on an idle machine); deterministic
# kernels so the same seed gives the same weights in every run (warn on ops lacking one).
torch.set_num_threads(int(os.environ.get("FINDLADY_TEST_THREADS", "1")))
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS if a GPU is used
torch.use_deterministic_algorithms(True, warn_only=True)

Trained = tuple[nn.Module, dict[str, Tensor]]


@pytest.fixture(scope="session")
def digits_data() -> tuple[TensorDataset, TensorDataset]:
    return data.digits(0)


@pytest.fixture(scope="session")
def mnist_data() -> tuple[TensorDataset, TensorDataset]:
    return data.mnist5k(0)


@pytest.fixture(scope="session")
def trained_mlp() -> Trained:
    return train.trained("mlp", 0)


@pytest.fixture(scope="session")
def trained_vgg() -> Trained:
    return train.trained("vgg", 0)


@pytest.fixture(scope="session")
def trained_resnet() -> Trained:
    return train.trained("resnet", 0)


@pytest.fixture(scope="session")
def trained_mnist_cnn() -> Trained:
    return train.trained("mnist_cnn", 0)


@pytest.fixture(scope="session")
def watermarked_mnist_cnn() -> tuple[nn.Module, dict[str, Tensor], WatermarkKey]:
    """The MNIST CNN trained with the same seed as ``trained_mnist_cnn`` plus a 64-bit Uchida
    key embedded in ``conv2.weight``: (model, state_dict, key)."""
    model, sd, key = train.watermarked("mnist_cnn", 0, bits=64)
    assert isinstance(key, WatermarkKey)
    return model, sd, key


@pytest.fixture(scope="session")
def mnist_cnn_spec() -> Spec:
    """The traced spec of the MNIST CNN (conv1, conv2, fc1 groups)."""
    return trace_spec(models.build("mnist_cnn"), models.example_input("mnist_cnn"))


@pytest.fixture(autouse=True, scope="session")
def _every_report_matches_the_schema():  # type: ignore[no-untyped-def]
    """Every report the suite builds in this process (the CLI in-process, the embedded service's
    worker threads, the core tests) is validated against the published schema as it is
    assembled; a report that does not match fails the test that produced it (a job: fails it)."""
    import findlady_core.report as report_module

    from report_schema import CHECKED, assert_valid  # tests/ is on sys.path (rootdir conftest)

    original = report_module.assemble

    def checked(**blocks):  # type: ignore[no-untyped-def]
        doc = original(**blocks)
        assert_valid(doc)
        CHECKED.append(doc["verdict"])
        return doc

    report_module.assemble = checked
    yield
    report_module.assemble = original
