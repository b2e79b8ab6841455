"""The app's streaming and stop paths through gradio_client, against the real running app."""
import json
import time
from pathlib import Path

import pytest
import yaml

from app_server import AppServer
from trainer.data.demo import make_demo_dataset


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = AppServer(tmp_path_factory.mktemp("api") / "workspace", "--data-dir", str(tmp_path_factory.getbasetemp()))
    yield s
    s.stop()


def config(data, name, steps):
    return yaml.safe_dump({
        "name": name, "model": {"base": "tiny-random"},
        "dataset": {"source": str(data), "resolution": 64, "bucket_min_side": 32, "bucket_max_side": 128,
                    "bucket_step": 16},
        "network": {"rank": 4}, "train": {"steps": steps, "learning_rate": 1e-3, "device": "cpu"},
        "save": {"every_n_steps": 5}})


def test_a_wrong_caption_column_or_an_empty_folder_is_refused_at_start_and_leaves_no_run(server, tmp_path):
    import datasets
    from gradio_client import Client
    from PIL import Image

    rows = {"image": [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(3)], "en_text": ["a", "b", "c"]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "empty").mkdir()
    client = Client(server.url, verbose=False)
    before = sorted((server.workspace / "runs").glob("*")) if (server.workspace / "runs").exists() else []
    with pytest.raises(Exception, match="no caption column 'text'.*en_text"):
        client.predict(config(tmp_path / "hf", "wrong-column", 5), api_name="/start_run")
    with pytest.raises(Exception, match="No usable images in .*the folder is empty"):
        client.predict(config(tmp_path / "empty", "empty", 5), api_name="/start_run")
    after = sorted((server.workspace / "runs").glob("*")) if (server.workspace / "runs").exists() else []
    assert after == before


def test_watch_streams_progress_and_stop_leaves_a_resumable_run(server, tmp_path):
    from gradio_client import Client

    data = make_demo_dataset(tmp_path / "d", count=4, size=64)
    client = Client(server.url, verbose=False)
    name = client.predict(config(data, "api run", 500), api_name="/start_run")
    assert name == "api-run"
    job = client.submit(name, api_name="/watch")
    seen = []
    for update in job:
        seen.append(update)
        if update["step"] >= 8 and len(seen) > 1 and not any(s.get("stopping") for s in seen):
            assert client.predict(api_name="/stop_run").startswith("Stopping")
            seen[-1]["stopping"] = True
    final = seen[-1]
    assert final["state"] == "stopped" and 8 <= final["step"] < 500
    steps = [s["step"] for s in seen]
    assert steps == sorted(steps) and len(set(steps)) > 2  # it streamed, not one answer at the end
    status = json.loads((server.workspace / "runs" / name / "status.json").read_text())
    assert status["state"] == "stopped"
    assert (server.workspace / "runs" / name / "checkpoints" / f"step-{final['step']:06d}").exists()


def test_a_second_start_waits_in_the_queue_and_can_be_cancelled(server, tmp_path):
    from gradio_client import Client

    data = make_demo_dataset(tmp_path / "d", count=4, size=64)
    client = Client(server.url, verbose=False)
    first = client.predict(config(data, "first", 300), api_name="/start_run")
    status = server.workspace / "runs" / first / "status.json"
    deadline = time.time() + 60  # the previous test's job may still be ending: it holds the device till then
    while json.loads(status.read_text())["state"] != "running" and time.time() < deadline:
        time.sleep(0.2)
    second = client.predict(config(data, "second", 5), api_name="/start_run")
    third = client.predict(config(data, "third", 3), api_name="/start_run")
    assert client.predict(second, api_name="/queue_position") == 1
    assert client.predict(third, api_name="/queue_position") == 2
    assert client.predict(second, api_name="/cancel_run") == "Cancelled second."
    assert client.predict(third, api_name="/queue_position") == 1
    assert not (server.workspace / "runs" / second).exists()  # it never started: no 'stopped 0/5' left behind
    client.predict(api_name="/stop_run")
    for update in client.submit(first, api_name="/watch"):
        pass
    assert update["state"] == "stopped"
    for update in client.submit(third, api_name="/watch"):  # the queue moves on by itself
        pass
    assert update["state"] == "completed"
    with pytest.raises(Exception, match="Unknown config key 'train.stepz'"):
        client.predict("train: {stepz: 3}", api_name="/start_run")


def test_a_run_opened_in_the_history_offers_each_of_its_lora_files(server, tmp_path):
    """The final file and, when the run wrote them, its EMA average's (and its best step's)."""
    from gradio_client import Client

    data = make_demo_dataset(tmp_path / "ema", count=4, size=64)
    client = Client(server.url, verbose=False)
    cfg = yaml.safe_load(config(data, "with-ema", 4))
    cfg["train"]["ema"] = True
    name = client.predict(yaml.safe_dump(cfg), api_name="/start_run")
    for update in client.submit(name, api_name="/watch"):
        pass
    assert update["state"] == "completed", update
    info, config_text, plot, samples, files = client.predict(name, api_name="/open_run")
    names = {Path(f).name for f in files}
    assert names - {"with-ema-best.safetensors"} == {"with-ema.safetensors", "with-ema-ema.safetensors"}, names
