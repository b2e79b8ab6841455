"""A workspace the app cannot write (a read-only mount): every action says so, none fails bare."""
import subprocess

import pytest

from app_server import AppServer
from trainer.data.demo import make_demo_dataset


@pytest.fixture
def read_only_server(tmp_path):
    ws = tmp_path / "ws"
    for sub in ("runs", "datasets", "models", "loras", "exports"):
        (ws / sub).mkdir(parents=True)
    mounted = subprocess.run(["mount", "--bind", str(ws), str(ws)], capture_output=True).returncode == 0
    if not mounted or subprocess.run(["mount", "-o", "remount,bind,ro", str(ws)], capture_output=True).returncode:
        if mounted:
            subprocess.run(["umount", str(ws)])
        pytest.skip("needs root to make a read-only mount")
    server = AppServer(ws, "--data-dir", str(tmp_path))
    yield server
    server.stop()
    subprocess.run(["umount", str(ws)], check=True)


def test_actions_on_a_read_only_workspace_say_what_is_wrong(read_only_server, tmp_path):
    from gradio_client import Client

    client = Client(read_only_server.url, verbose=False)
    with pytest.raises(Exception, match="could not write to the workspace .*read-only"):
        client.predict(api_name="/on_demo")
    data = make_demo_dataset(tmp_path / "data", count=2, size=64)
    with pytest.raises(Exception, match="could not write to the workspace .*read-only"):
        client.predict(f"model: {{base: tiny-random}}\ndataset: {{source: '{data}', resolution: 64}}\n",
                       api_name="/start_run")
