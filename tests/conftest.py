"""Fixtures every test shares."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_tightfit_home(tmp_path_factory):
    """Keep the trust record of ``.pt2`` archives (``tightfit.trust``) out of the user's home: the
    tests' exports go to a record of their own, which subprocesses inherit through the variable."""
    previous = os.environ.get("TIGHTFIT_HOME")
    os.environ["TIGHTFIT_HOME"] = str(tmp_path_factory.mktemp("tightfit-home"))
    yield
    if previous is None:
        os.environ.pop("TIGHTFIT_HOME", None)
    else:
        os.environ["TIGHTFIT_HOME"] = previous
