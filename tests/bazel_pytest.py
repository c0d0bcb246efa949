"""Bazel entry point: runs pytest on the test modules given as arguments."""

import os
import sys

import pytest

if __name__ == "__main__":
    here = os.path.dirname(os.path.realpath(__file__))
    paths = [os.path.join(here, os.path.basename(a)) for a in sys.argv[1:]]
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *paths]))
