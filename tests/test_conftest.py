"""The suite's own rules: under CI=true a skipped test is a failure."""

import pathlib

pytest_plugins = ["pytester"]

CONFTEST = (pathlib.Path(__file__).parent / "conftest.py").read_text()
SKIPPING = """
import pytest

def test_needs_a_missing_package():
  pytest.importorskip("a_package_that_is_not_installed")

def test_runs():
  pass
"""


def test_a_skip_fails_under_ci_and_is_reported_as_a_skip_elsewhere(pytester, monkeypatch):
  pytester.makeconftest(CONFTEST)
  pytester.makepyfile(test_skipping=SKIPPING)
  monkeypatch.delenv("CI", raising=False)
  pytester.runpytest_subprocess("-q").assert_outcomes(passed=1, skipped=1)
  monkeypatch.setenv("CI", "true")
  result = pytester.runpytest_subprocess("-q")
  result.assert_outcomes(passed=1, failed=1)
  result.stdout.fnmatch_lines(["*skipped under CI=true, where every test must run*a_package_that_is_not_installed*"])
