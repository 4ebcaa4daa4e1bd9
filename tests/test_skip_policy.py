"""The skip policy (tests/skip_policy.py) on tiny test files run by pytester: under CI a skip not on
the allowlist fails a run that would pass, a listed one does not, and every skip is listed."""

from __future__ import annotations

import pytest

TESTS = """
import pytest

def test_runs():
    assert True

@pytest.mark.skip(reason="needs a unicorn")
def test_unicorn():
    pass

def test_optional_package():
    pytest.importorskip("no_such_package_here")
"""


@pytest.fixture(autouse=True)
def _bare(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner runs without the installed plugins (schemathesis alone takes seconds to import), CI unset."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("CI", raising=False)


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_tiny=TESTS)
    return pytester


def allowlist(pytester: pytest.Pytester, *lines: str) -> str:
    path = pytester.path / "skips.txt"
    path.write_text("# comment\n\n" + "\n".join(lines) + "\n")
    return f"--skip-allowlist={path}"


def test_an_unlisted_skip_fails_the_run_and_is_named(suite: pytest.Pytester) -> None:
    listed = allowlist(suite, "test_tiny.py::test_unicorn | needs a unicorn | no unicorns in CI")
    result = suite.runpytest("-p", "skip_policy", "--check-skips", listed)
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*skips (2, 1 not on *skips.txt)*",
            "test_tiny.py::test_unicorn: needs a unicorn [[]allowed: no unicorns in CI[]]",
            "test_tiny.py::test_optional_package: could not import 'no_such_package_here'* [[]NOT ALLOWED[]]",
            "1 skip(s) not on the allowlist*",
        ]
    )


def test_listed_skips_pass_and_are_listed(suite: pytest.Pytester) -> None:
    listed = allowlist(
        suite,
        "test_tiny.py::test_unicorn | needs a unicorn | no unicorns in CI",
        "* | could not import 'no_such_package_here'* | an optional extra",
    )
    result = suite.runpytest("-p", "skip_policy", "--check-skips", listed)
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*skips (2, 0 not on*", "*test_optional_package*[[]allowed: an optional extra[]]"])


def test_the_reason_must_match_too(suite: pytest.Pytester) -> None:
    listed = allowlist(suite, "test_tiny.py::* | needs a unicorn | no unicorns in CI")
    result = suite.runpytest("-p", "skip_policy", "--check-skips", listed)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*test_optional_package*[[]NOT ALLOWED[]]"])


def test_ci_in_the_environment_turns_the_check_on(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    listed = allowlist(suite, "* | needs a unicorn | no unicorns in CI")
    assert suite.runpytest("-p", "skip_policy", listed).ret == pytest.ExitCode.OK  # off: skips are not judged
    monkeypatch.setenv("CI", "false")
    assert suite.runpytest("-p", "skip_policy", listed).ret == pytest.ExitCode.OK
    monkeypatch.setenv("CI", "true")
    assert suite.runpytest("-p", "skip_policy", listed).ret == pytest.ExitCode.TESTS_FAILED


def test_a_module_skipped_at_collection_is_judged(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_whole="import pytest\npytest.importorskip('no_such_package_here')\n")
    result = pytester.runpytest("-p", "skip_policy", "--check-skips", allowlist(pytester, "x | y | z"))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["test_whole.py: could not import*[[]NOT ALLOWED[]]"])


def test_a_failing_run_keeps_its_own_status(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bad="import pytest\ndef test_x():\n    pytest.skip('no')\ndef test_y():\n    assert 0\n")
    result = pytester.runpytest("-p", "skip_policy", "--check-skips", allowlist(pytester, "x | y | z"))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=1, skipped=1)


@pytest.mark.parametrize("line", ["only | two", "a | | c", "a | b | c | d"])
def test_a_malformed_allowlist_line_is_named(pytester: pytest.Pytester, line: str) -> None:
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    result = pytester.runpytest("-p", "skip_policy", "--check-skips", allowlist(pytester, line))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*skip allowlist *skips.txt:3: expected '<test id glob> | <reason glob> | <why>'*"])


def test_the_repository_allowlist_loads() -> None:
    from skip_policy import DEFAULT_ALLOWLIST, Skip, SkipPolicy, load_allowlist

    policy = SkipPolicy(load_allowlist(DEFAULT_ALLOWLIST), DEFAULT_ALLOWLIST)
    ray = Skip("tests/test_eval_e2e.py::test_ray_replicas_give_the_same_predictions", "could not import 'ray': x")
    gpu = Skip("tests/test_gpu.py::test_x", "gpu tier: no CUDA device here")
    other = Skip("tests/test_model.py", "could not import 'transformers': No module named 'transformers'")
    assert policy.unlisted() == [] and policy.verdict(ray) and policy.verdict(gpu)
    assert policy.verdict(other) is None
