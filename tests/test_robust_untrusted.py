"""Untrusted users: paths stay inside the allowed folders, names are sanitized, warnings are loud."""
import os
import subprocess
import sys
import time

import pytest

from app_server import ROOT, free_port
from trainer.errors import LoraLabError
from trainer.runs import new_run, safe_name
from ui.access import read_path
from ui.context import AppContext


def test_a_shared_app_confines_paths_to_the_workspace_and_configured_folders(tmp_path):
    allowed = tmp_path / "data"
    (allowed / "set").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    ctx = AppContext.create(tmp_path / "ws", data_dirs=[str(allowed)], local=False)  # e.g. --share
    assert read_path(ctx, str(allowed / "set")) == (allowed / "set").resolve()
    assert read_path(ctx, "datasets") == (tmp_path / "ws" / "datasets").resolve()
    for bad in [str(secret), str(allowed / ".." / "secret"), "../../secret", "/etc"]:
        with pytest.raises(LoraLabError, match="outside the folders"):
            read_path(ctx, bad)
    (allowed / "link").symlink_to(secret)
    with pytest.raises(LoraLabError, match="outside the folders"):
        read_path(ctx, str(allowed / "link"))


def test_a_local_launch_uses_any_folder_the_user_types(tmp_path):
    """Served on this machine only, to one user: their folders are theirs (no --data-dir needed)."""
    from gradio_client import Client

    from app_server import AppServer
    from trainer.data.demo import make_demo_dataset

    folder = make_demo_dataset(tmp_path / "anywhere" / "one-line-art", count=3, size=64)
    server = AppServer(tmp_path / "ws")
    try:
        client = Client(server.url, verbose=False)
        message, counts, *_ = client.predict(str(folder), "train", "image", "text", api_name="/on_load")
        assert "3 images" in counts, message
        message, *_ = client.predict("sks", "", "", "", "", api_name="/on_apply")  # captions are theirs too
        assert message.startswith("Changed 3 of 3"), message
        assert all(p.read_text().startswith("sks, ") for p in folder.glob("*.txt"))
    finally:
        server.stop()


@pytest.mark.parametrize("name, expect", [("../../etc/passwd", "etc-passwd"), ("my run", "my-run"),
                                          ("ça/va?", "a-va"), ("", "lora"), ("..", "lora")])
def test_run_names_are_sanitized(name, expect, tmp_path):
    assert safe_name(name) == expect
    run = new_run(tmp_path, name)
    assert run.path.parent == tmp_path / "runs"


def test_sharing_without_auth_prints_a_prominent_warning(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--no-browser", "--host", "0.0.0.0", "--port",
                             str(port), "--workspace", str(tmp_path / "ws")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        time.sleep(3)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "WARNING: LoRA Lab is reachable from other machines without a password" in err
    assert "--auth user:password" in err


def test_devices_the_machine_lacks_are_refused_when_the_app_starts(tmp_path):
    """Not at a user's first run, with advice about a server flag they can't change."""
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "--no-browser", "--workspace", str(tmp_path / "ws"),
                           "--devices", "cuda:0,cuda:99"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert proc.returncode == 2, proc.stderr
    assert "--devices cuda:0,cuda:99: cuda:" in proc.stderr and "is not here: this machine has" in proc.stderr
    assert "Leave --devices out" in proc.stderr
    from trainer.jobs import missing_devices

    assert "named twice" in missing_devices(["cpu", "cpu"]) and "not a device name" in missing_devices(["foo"])
    assert "not a device LoRA Lab trains on" in missing_devices(["xpu:7"]) and missing_devices(["cpu"]) is None
