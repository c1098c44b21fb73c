"""pytest set-up: trial's mktemp() writes under the working directory, so the
suite runs from a scratch directory instead of the source tree."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _scratch_working_directory(tmp_path_factory):
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)
