"""Test configuration: the Triton kernels run in Triton's interpreter without a GPU; fixtures over architectures and schedulers."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # run the Triton kernels in Triton's interpreter (decided at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tests.helpers import ARCHS, SCHEDULERS


@pytest.fixture(params=list(ARCHS))
def arch(request):
    return request.param


@pytest.fixture(params=[name for name, (_, evals) in SCHEDULERS.items() if evals == 1])
def scheduler_cls(request):
    return SCHEDULERS[request.param][0]


@pytest.fixture(autouse=True)
def no_kernel_fails_its_check(request):
    """A kernel variant that fails its first-use check runs the PyTorch path, so a test of the result would pass:
    every test also fails if a variant failed during it (tests that inject a wrong kernel say so with the marker
    ``wrong_kernel``)."""
    from attnreuse.kernels import selfcheck
    before = set(selfcheck.failures())
    yield
    new = [str(v) for v in selfcheck.failures() if v not in before]
    if new and request.node.get_closest_marker("wrong_kernel") is None:
        pytest.fail(f"kernel variants failed their first-use check: {new}")


def pytest_configure(config):
    config.addinivalue_line("markers", "wrong_kernel: the test injects a kernel that must fail its first-use check")


def pytest_collection_finish(session):
    """Compiling every UNet launch for three GPU targets under two Tritons takes minutes of CPU: start it now, beside
    the other tests, when tests/test_compiled_launches.py is to run."""
    if any(item.path.name == "test_compiled_launches.py" for item in session.items):
        from tests import compile_matrix
        compile_matrix.start()


def pytest_sessionfinish(session):
    from tests import compile_matrix
    compile_matrix.stop()
