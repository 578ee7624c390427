"""Start and stop a real Label Studio server for the tests.

`scripts/labelstudio-server.sh install` puts the server in its own venv and builds a template
database; `LabelStudioServer` copies that template to a scratch folder, starts
`label-studio start` on 127.0.0.1 on a free port, waits for /health and stops it by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = "run `scripts/labelstudio-server.sh install` (or `make test`, which does it)"


def install_home() -> Path:
    return Path(os.environ.get("FREESHAP_DQ_LABEL_STUDIO_HOME", REPO / ".labelstudio"))


def is_installed(home: Path) -> bool:
    return any(home.glob("installed-*")) and (home / "venv" / "bin" / "label-studio").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LabelStudioServer:
    def __init__(self, home: Path, workdir: Path):
        self.home = home
        workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = workdir / "data"
        self.log_path = workdir / "server.log"
        self.token = (home / "token").read_text().strip()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir),
            XDG_CONFIG_HOME=str(self.data_dir / "config"),
            LABEL_STUDIO_USERNAME="test@example.com",
            LABEL_STUDIO_PASSWORD="freeshap-dq-test-only",
            LABEL_STUDIO_USER_TOKEN=self.token,
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
            LABEL_STUDIO_LATEST_VERSION_CHECK="false",
            LABEL_STUDIO_SENTRY_DSN="",
            LABEL_STUDIO_FRONTEND_SENTRY_DSN="",
            LABEL_STUDIO_COLLECT_ANALYTICS="false",
        )
        return env

    def start(self, timeout: float = 120.0) -> LabelStudioServer:
        """Start on a copy of the template, or on the same data again after ``stop()`` (same port)."""
        if not self.data_dir.exists():
            shutil.copytree(self.home / "template", self.data_dir)
        command = [str(self.home / "venv" / "bin" / "label-studio"), "start", "--no-browser",
                   "--internal-host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.data_dir, env=self.environment(),
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Label Studio exited with {self.process.returncode}:\n"
                                   + self.log_tail())
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Label Studio did not answer /health within {timeout:.0f} s:\n"
                           + self.log_tail())

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
