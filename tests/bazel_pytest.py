"""Bazel entry point: runs pytest on the test modules given as arguments."""

import os
import sys

import pytest

if __name__ == "__main__":
    here = os.path.dirname(os.path.realpath(__file__))
    paths = [os.path.join(here, os.path.basename(a)) for a in sys.argv[1:]]
    code = pytest.main(["-q", "-p", "no:cacheprovider", *paths])
    # A module whose tests are defined for the other backend only (``if keras.backend.backend() == ...``)
    # collects nothing here: that is a pass, not a failure.
    sys.exit(0 if code == pytest.ExitCode.NO_TESTS_COLLECTED else code)
