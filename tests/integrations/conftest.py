"""A real Label Studio server for the integration tests (see labelstudio_server.py).

Tests needing it are skipped only when FREESHAP_DQ_SKIP_LABEL_STUDIO=1 says so (loudly, in the summary),
or outside CI when the server is not installed; in CI a missing server fails them.
"""

import os

import pytest
from labelstudio_server import INSTALL_HINT, LabelStudioServer, install_home, is_installed

SKIP_VARIABLE = "FREESHAP_DQ_SKIP_LABEL_STUDIO"


def label_studio_unavailable() -> str | None:
    if os.environ.get(SKIP_VARIABLE) == "1":
        return f"Label Studio tests DISABLED by {SKIP_VARIABLE}=1"
    home = install_home()
    if not is_installed(home):
        message = f"Label Studio server not installed in {home}: {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        return message
    return None


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """One server per test session, on 127.0.0.1 and a free port, stopped by PID afterwards."""
    reason = label_studio_unavailable()
    if reason:
        pytest.skip(reason)
    server = LabelStudioServer(install_home(), tmp_path_factory.mktemp("label-studio")).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_label_studio(tmp_path):
    """A server of its own, for tests that stop and restart it."""
    reason = label_studio_unavailable()
    if reason:
        pytest.skip(reason)
    server = LabelStudioServer(install_home(), tmp_path / "label-studio").start()
    yield server
    server.stop()


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "Label Studio" in str(r.longrepr)]
    if skipped:
        reason = str(skipped[0].longrepr[2]) if isinstance(skipped[0].longrepr, tuple) else str(skipped[0].longrepr)
        terminalreporter.write_sep("!", f"{len(skipped)} LABEL STUDIO TESTS SKIPPED: {reason}", red=True, bold=True)
