import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import fastlstm  # noqa: E402


def _isas():
    return fastlstm.cpu_info()["isas_available"]


@pytest.fixture(params=_isas())
def isa(request):
    """Run a test once on every kernel path this machine has."""
    prev = fastlstm.cpu_info()["isa"]
    active = fastlstm.set_isa(request.param)
    assert active == request.param
    yield active
    fastlstm.set_isa(prev)
