"""Start the real app in a subprocess on a free port, for browser and API tests."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    def __init__(self, workspace: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.workspace = Path(workspace)
        self.log = self.workspace.parent / f"app-{self.port}.log"
        cmd = [sys.executable, str(ROOT / "app.py"), "--no-browser", "--port", str(self.port),
               "--workspace", str(workspace), *args]
        full_env = {**os.environ, "GRADIO_TEMP_DIR": str(self.workspace.parent / "gradio-tmp"),
                    "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT)
        self.started = time.time()
        self.ready_after = self.wait_up()

    def wait_up(self, timeout: float = 90) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return time.time() - self.started
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"app did not come up: {self.log.read_text()[-3000:]}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

