"""A pytest plugin that makes skips visible and, where asked, fails a run on a skip nobody allowed.

Contract:

- Every skip of the run (a test's, or a whole module's at collection) is recorded with its test id
  and reason.
- The check is on when ``--check-skips`` is given or the ``CI`` environment variable is set to
  anything but "", "0" or "false" (``.ci/run`` exports ``CI=true``). Then the end of the run lists
  every skip and whether the allowlist allows it, and a run that would otherwise pass exits 1
  (tests failed) if any skip is not allowed (so does one where everything skipped at collection).
- The allowlist (``tests/skips.txt`` unless ``--skip-allowlist PATH``) has one entry a line:
  ``<test id glob> | <reason glob> | <why this skip is allowed>``. A skip is allowed when both globs
  (:func:`fnmatch.fnmatchcase`) match its test id and its reason. Blank lines and lines starting
  with ``#`` are ignored. A malformed line is a usage error naming the file and line.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from pathlib import Path

import pytest

DEFAULT_ALLOWLIST = Path(__file__).with_name("skips.txt")


@dataclasses.dataclass(frozen=True)
class Allowed:
    """One allowlist entry: test id and reason globs, and why such a skip is fine."""

    test_id: str
    reason: str
    why: str

    def allows(self, skip: Skip) -> bool:
        return fnmatch.fnmatchcase(skip.test_id, self.test_id) and fnmatch.fnmatchcase(skip.reason, self.reason)


@dataclasses.dataclass(frozen=True)
class Skip:
    """A skip seen in this run: the test (or module) id and the reason pytest reported."""

    test_id: str
    reason: str


def load_allowlist(path: Path) -> list[Allowed]:
    """The entries of the allowlist at ``path``; a malformed line raises :class:`pytest.UsageError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise pytest.UsageError(f"skip allowlist {path}: {exc.strerror or exc}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [field.strip() for field in line.split("|")]
        if len(fields) != 3 or not all(fields):
            raise pytest.UsageError(
                f"skip allowlist {path}:{number}: expected '<test id glob> | <reason glob> | <why>', got {line!r}"
            )
        entries.append(Allowed(*fields))
    return entries


def _check_requested(config: pytest.Config) -> bool:
    if config.getoption("check_skips"):
        return True
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The skip's reason as ``-rs`` prints it (without pytest's "Skipped: " prefix)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


class SkipPolicy:
    """Records the run's skips; at its end lists them and fails the run on one not allowed."""

    def __init__(self, allowlist: list[Allowed], source: Path) -> None:
        self.allowlist = allowlist
        self.source = source
        self.skips: list[Skip] = []

    def verdict(self, skip: Skip) -> Allowed | None:
        return next((entry for entry in self.allowlist if entry.allows(skip)), None)

    def unlisted(self) -> list[Skip]:
        return [skip for skip in self.skips if self.verdict(skip) is None]

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:
            self.skips.append(Skip(report.nodeid, _reason(report)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skips.append(Skip(report.nodeid, _reason(report)))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.unlisted() and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.skips:
            return
        unlisted = self.unlisted()
        terminalreporter.section(f"skips ({len(self.skips)}, {len(unlisted)} not on {self.source})")
        for skip in self.skips:
            entry = self.verdict(skip)
            verdict = f"allowed: {entry.why}" if entry else "NOT ALLOWED"
            terminalreporter.line(f"{skip.test_id}: {skip.reason} [{verdict}]", red=entry is None)
        if unlisted:
            terminalreporter.line(
                f"{len(unlisted)} skip(s) not on the allowlist {self.source}: the run fails. Make the test run "
                "here, or add a line '<test id glob> | <reason glob> | <why>' to the allowlist.",
                red=True,
                bold=True,
            )


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("skip policy")
    group.addoption(
        "--check-skips",
        action="store_true",
        default=False,
        help="list every skip and fail the run on a skip not on the allowlist (on by default when CI is set)",
    )
    group.addoption(
        "--skip-allowlist",
        default=None,
        type=Path,
        help=f"the allowlist of skips (default {DEFAULT_ALLOWLIST})",
    )


def pytest_configure(config: pytest.Config) -> None:
    if not _check_requested(config):
        return
    source = config.getoption("skip_allowlist") or DEFAULT_ALLOWLIST
    config.pluginmanager.register(SkipPolicy(load_allowlist(source), source), "skip-policy")
