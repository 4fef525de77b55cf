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
