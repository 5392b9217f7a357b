"""pytest plugin of run_suite.py: records each test's outcome as it happens, one JSON line each.

run_suite.py loads it with `-p suite_results` and names the file in SGLANG_SUITE_RESULTS. A test
writes `{"event": "start", "nodeid": ...}` when it begins and `{"event": "done", "nodeid": ...,
"outcome": "passed" | "failed" | "skipped"}` after its teardown, so a file killed by its timeout
still tells what ran and which test was running. A test is failed when any phase (setup, call,
teardown) failed, skipped when setup or call skipped (xfail included), passed otherwise. A file
that fails to import is one failed entry; a module-level `pytest.skip` is one skipped entry.
"""

from __future__ import annotations

import json
import os

import pytest

RESULTS_ENV = "SGLANG_SUITE_RESULTS"

_outcome: dict[str, str] = {}


def _write(record: dict[str, str]) -> None:
    # Appended and closed per line: the runner may SIGKILL this process at any moment.
    with open(os.environ[RESULTS_ENV], "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    _write({"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    seen = _outcome.get(report.nodeid, "passed")
    if report.failed:
        seen = "failed"
    elif report.skipped and seen != "failed":
        seen = "skipped"
    _outcome[report.nodeid] = seen
    if report.when == "teardown":
        _write({"event": "done", "nodeid": report.nodeid, "outcome": _outcome.pop(report.nodeid)})


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed or report.skipped:
        outcome = "failed" if report.failed else "skipped"
        _write({"event": "done", "nodeid": report.nodeid or ".", "outcome": outcome})
