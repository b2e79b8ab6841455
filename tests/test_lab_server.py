"""A lab server: several users, each with their own datasets and runs, sharing one device queue."""
import json
import shutil
import time
from pathlib import Path

import pytest

from app_server import AppServer
from trainer.data.demo import make_demo_dataset

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    users = tmp_path_factory.mktemp("lab") / "users.txt"
    users.write_text("# the class\nalice:apple\nbob:banana\n")
    s = AppServer(tmp_path_factory.mktemp("lab") / "workspace", "--users", str(users), "--data-dir", str(base))
    yield s
    s.stop()


def cfg(data, name, steps):
    return (f"name: {name}\nmodel: {{base: tiny-random}}\ndataset: {{source: '{data}', resolution: 64, "
            f"bucketing: false}}\ntrain: {{steps: {steps}, device: cpu}}\nsave: {{every_n_steps: 0}}\n")


def test_users_see_only_their_own_runs_and_share_the_queue(server, tmp_path):
    from gradio_client import Client

    with pytest.raises(Exception):
        Client(server.url, auth=("alice", "wrong"), verbose=False)
    alice = Client(server.url, auth=("alice", "apple"), verbose=False)
    bob = Client(server.url, auth=("bob", "banana"), verbose=False)
    data = make_demo_dataset(tmp_path / "class data", count=4, size=64)  # a shared --data-dir folder
    a_run = alice.predict(cfg(data, "alice run", 400), api_name="/start_run")
    b_run = bob.predict(cfg(data, "bob run", 3), api_name="/start_run")
    assert bob.predict(b_run, api_name="/queue_position") == 1  # one device: Bob waits, and sees where
    with pytest.raises(Exception, match="no run 'bob-run' of yours"):  # Alice sees nothing of Bob's
        alice.predict(b_run, api_name="/queue_position")
    with pytest.raises(Exception, match="no run 'alice-run'"):
        bob.submit(a_run, api_name="/watch").result()
    assert bob.predict(b_run, api_name="/cancel_run") == "Cancelled bob-run."
    assert bob.predict(api_name="/stop_run") == "No run of yours is going."  # Bob can't stop Alice
    alice_demo = alice.predict(api_name="/on_demo")
    assert "/users/alice/" in alice_demo
    with pytest.raises(Exception, match="outside the folders"):
        bob.predict(cfg(alice_demo, "peek", 3), api_name="/start_run")
    b_run = bob.predict(cfg(data, "bob again", 3), api_name="/start_run")
    assert alice.predict(api_name="/stop_run") == "Stopping alice-run."
    for update in bob.submit(b_run, api_name="/watch"):
        pass
    assert update["state"] == "completed"
    ws = server.workspace
    assert (ws / "users" / "alice" / "runs" / "alice-run").is_dir()
    assert json.loads((ws / "users" / "bob" / "runs" / "bob-again" / "status.json").read_text())["state"] == "completed"
    assert not (ws / "runs" / "alice-run").exists()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (see .ci/run)")
def test_each_users_live_page_follows_their_own_run_only(server, tmp_path):
    """The Train tab's live panel and run history stream each logged-in user's own runs."""
    from gradio_client import Client
    from playwright.sync_api import sync_playwright

    data = make_demo_dataset(tmp_path / "live data", count=4, size=64)
    alice = Client(server.url, auth=("alice", "apple"), verbose=False)
    bob = Client(server.url, auth=("bob", "banana"), verbose=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(server.url)
        page.get_by_label("username").fill("alice")
        page.get_by_label("password").fill("apple")
        page.get_by_role("button", name="Login").click()
        page.get_by_role("tab", name="3 · Train").click()
        bob_run = bob.predict(cfg(data, "bob live", 400), api_name="/start_run")
        time.sleep(5)  # two looks of the stream
        assert page.locator("#run-progress").get_attribute("data-state") in ("none", "completed", "stopped")
        assert "bob" not in page.inner_text("#run-history")
        alice.predict(cfg(data, "alice live", 400), api_name="/start_run")  # waits behind Bob's
        deadline = time.time() + 20
        while time.time() < deadline and "alice-live" not in page.inner_text("#run-history"):
            time.sleep(0.5)
        assert page.locator("#run-progress").get_attribute("data-state") == "queued"
        assert "alice-live" in page.inner_text("#run-history") and "bob" not in page.inner_text("#run-history")
        browser.close()
    alice.predict("alice-live", api_name="/cancel_run")
    bob.predict(api_name="/stop_run")
    for update in bob.submit(bob_run, api_name="/watch"):
        pass


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (see .ci/run)")
def test_every_open_page_follows_the_run(server, tmp_path):
    """More pages watching one run than the app runs events at once (4) all see it to its end."""
    from gradio_client import Client
    from playwright.sync_api import sync_playwright

    data = make_demo_dataset(tmp_path / "eyes data", count=4, size=64)
    alice = Client(server.url, auth=("alice", "apple"), verbose=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context()
        login = context.new_page()
        login.goto(server.url)
        login.get_by_label("username").fill("alice")
        login.get_by_label("password").fill("apple")
        login.get_by_role("button", name="Login").click()
        login.get_by_role("tab", name="3 · Train").wait_for(timeout=60_000)
        # One browser context each, as separate browsers: a browser opens at most 6 connections to one
        # server, and each open page keeps one for its live stream.
        logged_in = context.storage_state()
        pages = [login] + [browser.new_context(storage_state=logged_in).new_page() for _ in range(5)]
        for page in pages[1:]:
            page.goto(server.url)
        for page in pages:
            page.get_by_role("tab", name="3 · Train").click()
        name = alice.predict(cfg(data, "many eyes", 30), api_name="/start_run")
        deadline = time.time() + 300
        states = []
        while time.time() < deadline:
            states = [(pg.locator("#run-progress").get_attribute("data-state"),
                       pg.locator("#run-progress").get_attribute("data-step")) for pg in pages]
            if all(s == ("completed", "30") for s in states):
                break
            time.sleep(1)
        assert all(s == ("completed", "30") for s in states), states
        assert all(name in pg.inner_text("#run-history") for pg in pages)
        browser.close()
