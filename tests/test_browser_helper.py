"""The browser tests' install rule: outside CI a missing chromium skips with how to install it; with
CI=true it fails, so CI cannot go green without running them."""
import pytest
from _pytest.outcomes import Failed, Skipped

from tests.fixtures import browser


@pytest.mark.parametrize("ci,outcome", [("true", Failed), ("", Skipped)])
def test_a_missing_chromium_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path, ci, outcome):
    monkeypatch.setattr(browser, "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="apt-get install chromium"):
        browser.launch_chromium(playwright=None)
