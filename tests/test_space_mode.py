"""Space mode: server paths are refused, caps hold, and visitors don't see each other's runs."""
import pytest

from app_server import AppServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = AppServer(tmp_path_factory.mktemp("space") / "workspace", "--space",
                  env={"LORA_LAB_SPACE_MAX_STEPS": "20", "LORA_LAB_SPACE_MIN_FREE_MB": "64"})
    yield s
    s.stop()


def cfg(source, name, steps=4):
    return (f"name: {name}\nmodel: {{base: tiny-random}}\ndataset: {{source: '{source}', resolution: 64, "
            f"bucket_min_side: 32, bucket_max_side: 128, bucket_step: 16}}\ntrain: {{steps: {steps}}}\n")


def test_space_mode_isolates_visitors_and_refuses_server_paths(server, tmp_path):
    from gradio_client import Client

    # Each client keeps the visitor cookie the server hands out, as a browser does.
    alice, bob = Client(server.url, verbose=False), Client(server.url, verbose=False)
    with pytest.raises(Exception, match="folders on the server are not available"):
        alice.predict(cfg(tmp_path, "x"), api_name="/start_run")
    with pytest.raises(Exception, match="folders on the server are not available"):
        alice.predict(cfg("../../..", "x"), api_name="/start_run")
    demo = alice.predict(api_name="/on_demo")
    assert "/sessions/" in demo and demo.startswith(str(server.workspace))
    with pytest.raises(Exception, match="at most 20 steps"):
        alice.predict(cfg(demo, "long", steps=500), api_name="/start_run")
    with pytest.raises(Exception, match="only these models"):
        alice.predict(cfg(demo, "big").replace("tiny-random", "stabilityai/sdxl"), api_name="/start_run")
    name = alice.predict(cfg(demo, "mine"), api_name="/start_run")
    for update in alice.submit(name, api_name="/watch"):
        pass
    assert update["state"] == "completed"

    # Bob can neither use Alice's files nor see her run.
    with pytest.raises(Exception, match="folders on the server are not available"):
        bob.predict(cfg(demo, "theirs"), api_name="/start_run")
    with pytest.raises(Exception, match="no run 'mine'"):
        bob.submit("mine", api_name="/watch").result()
    assert bob.predict(api_name="/stop_run") == "No run of yours is going."
    runs = list((server.workspace / "sessions").glob("*/runs/mine"))
    assert len(runs) == 1 and not (server.workspace / "runs" / "mine").exists()
