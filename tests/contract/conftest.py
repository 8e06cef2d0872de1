"""Fixtures of the contract tests: the optimizer under test and torch's inputs."""

import pytest

from .subjects import SUBJECTS


@pytest.fixture(params=SUBJECTS, ids=[s.name for s in SUBJECTS])
def subject(request):
    return request.param
