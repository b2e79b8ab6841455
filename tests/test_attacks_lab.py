"""A lab server attacked by one of its users: Alice, logged in, goes after Bob's files and the server's.

Each test is a numbered finding of issue 14, tried through the real server (gradio_client and plain
HTTP on 127.0.0.1); each asserts the refusal and that nothing of Bob's changed or came back.
"""
import os
from pathlib import Path

import pytest

from app_server import ROOT, AppServer
from attack import SECRET, fetch, sweep, tree
from trainer.data.demo import make_demo_dataset

USERS = "alice:apple\nbob:banana\ncarol:cherry\ndave:date\nerin:elder\nalice.:dot\n"


def cfg(data, name, steps=3, **sections):
    import yaml

    data = {"name": name, "model": {"base": "tiny-random"},
            "dataset": {"source": str(data), "resolution": 64, "bucketing": False, "caption_prefix": SECRET},
            "train": {"steps": steps, "device": "cpu"}, "save": {"every_n_steps": 0}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return yaml.safe_dump(data)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("attacks")
    (base / "users.txt").write_text(USERS)
    shared = make_demo_dataset(base / "class data", count=4, size=64)
    server = AppServer(base / "workspace", "--users", str(base / "users.txt"), "--data-dir", str(shared))
    from gradio_client import Client

    alice = Client(server.url, auth=("alice", "apple"), verbose=False)
    bob = Client(server.url, auth=("bob", "banana"), verbose=False)
    bob_ws = server.workspace / "users" / "bob"
    bob_data = make_demo_dataset(bob_ws / "datasets" / "mine", count=4, size=72)
    first = sorted(bob_data.glob("*.txt"))[0]
    first.write_text(first.read_text() + f" {SECRET}")
    name = bob.predict(cfg(bob_data, "bob run"), api_name="/start_run")
    for update in bob.submit(name, api_name="/watch"):
        pass
    assert update["state"] == "completed", update
    lora = bob_ws / "runs" / "bob-run" / "bob-run.safetensors"
    assert lora.is_file()
    yield {"server": server, "alice": alice, "bob": bob, "bob_ws": bob_ws, "lora": lora, "shared": shared,
           "bob_files": tree(bob_ws), "shared_files": tree(shared)}
    server.stop()


def unchanged(lab):
    assert tree(lab["bob_ws"]) == lab["bob_files"], "something of Bob's changed"
    assert tree(lab["shared"]) == lab["shared_files"], "the shared class folder changed"


def refused(client, *args, api_name, says):
    with pytest.raises(Exception, match=says):
        client.predict(*args, api_name=api_name)


def test_1_the_export_zip_takes_only_the_callers_own_loras(lab):
    alice, lora = lab["alice"], lab["lora"]
    for value in ["/etc/passwd", str(ROOT / "app.py"), "/proc/self/environ", str(lora), "/dev/zero", "/dev/urandom",
                  "../../bob/runs/bob-run/bob-run.safetensors", "runs/../../bob/runs/bob-run/bob-run.safetensors"]:
        message, file = alice.predict("a prompt", value, 1.0, 1, 20, 7.0, "tiny-random", "", 0, 0, "euler_a",
                                      api_name="/on_export")
        assert "not one of your LoRAs" in message and not isinstance(file, str), (value, message)
    exports = lab["server"].workspace / "users" / "alice" / "exports"
    assert not list(exports.iterdir())  # no zip, no half-written temporary file
    unchanged(lab)


def test_2_run_history_delete_removes_only_the_callers_own_runs(lab, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for value in ["../../bob/runs/bob-run", str(lab["bob_ws"] / "runs" / "bob-run"), str(outside), "..", "/"]:
        message, *_ = lab["alice"].predict(value, api_name="/on_delete")
        assert "no run" in message and "of yours" in message, message
    assert outside.is_dir()
    unchanged(lab)


def test_3_run_names_reach_only_the_callers_own_runs(lab):
    alice = lab["alice"]
    for value in ["bob-run", "../../bob/runs/bob-run", "../users/bob/runs/bob-run", str(lab["bob_ws"] / "runs" / "bob-run")]:
        info, config, plot, samples, file = alice.predict(value, api_name="/open_run")
        assert "of yours" in info and not config and not isinstance(file, str)
        assert "of yours" in alice.predict(value, api_name="/on_resume")[1]
        assert "of yours" in alice.predict(value, api_name="/on_cancel")
        for api in ("/watch", "/queue_position", "/cancel_run"):
            refused(alice, value, api_name=api, says="of yours")
    unchanged(lab)


def _login_cookie(url, user, password) -> str:
    import httpx

    r = httpx.post(url + "login", data={"username": user, "password": password})
    assert r.status_code == 200, r.text
    return "; ".join(f"{k}={v}" for k, v in r.cookies.items())


def test_4_gradio_file_route_serves_only_the_callers_own_workspace(lab):
    url = lab["server"].url
    alice_cookie = _login_cookie(url, "alice", "apple")
    own = Path(lab["alice"].predict(api_name="/on_demo"))
    assert fetch(url, next(own.glob("*.png")), alice_cookie) == 200
    for victim in [lab["lora"], lab["bob_ws"] / "runs" / "bob-run" / "config.yaml", next(lab["bob_ws"].rglob("*.txt")),
                   f"{own}/../../../bob/runs/bob-run/config.yaml"]:
        for route in ("file=", "file/"):  # the second is Gradio's older spelling of the same route
            assert fetch(url, victim, alice_cookie, route) == 403, (route, victim)
    assert fetch(url, ROOT / "app.py", alice_cookie) == 403
    assert fetch(url, lab["lora"], "") in (401, 403)  # nobody logged in
    assert fetch(url, lab["lora"], _login_cookie(url, "bob", "banana")) == 200  # Bob gets his own


def test_5_config_paths_are_confined_to_what_the_caller_may_read(lab):
    alice, lora = lab["alice"], lab["lora"]
    data = lab["shared"]
    for sections, says in [({"network": {"init_from": str(lora)}}, "not one of your LoRAs"),
                           ({"network": {"init_from": "../../bob/runs/bob-run/bob-run.safetensors"}}, "not one of your"),
                           ({"model": {"base": "/etc/passwd"}}, "outside the folders"),
                           ({"model": {"base": str(lab["bob_ws"] / "runs")}}, "outside the folders"),
                           ({"model": {"config_dir": "/etc"}}, "outside the folders")]:
        refused(alice, cfg(data, "steal", **sections), api_name="/start_run", says=says)
    message, *_ = alice.predict(str(lora), "a prompt", "", 1, 2, 7.0, 64, 64, "euler_a", None, None, None, 1, 1, 1,
                                api_name="/on_generate")
    assert "outside the folders" in message
    message, *_ = alice.predict("tiny-random", "a prompt", "", 1, 2, 7.0, 64, 64, "euler_a", str(lora), None, None,
                                1, 1, 1, api_name="/on_generate")
    assert "not one of your LoRAs" in message
    assert not list((lab["server"].workspace / "users" / "alice" / "runs").glob("steal*"))
    unchanged(lab)


def test_6_a_name_with_one_slash_is_not_a_back_door_to_the_apps_folder(lab):
    assert (ROOT / "docs" / "screenshots").is_dir()  # relative to where the app runs
    refused(lab["alice"], cfg("docs/screenshots", "docs"), api_name="/start_run", says="does not exist")
    message, counts, *_ = lab["alice"].predict("docs/screenshots", "train", "image", "text", api_name="/on_load")
    assert "does not exist" in message and not isinstance(counts, str)


def test_7_the_shared_class_dataset_is_read_only(lab):
    alice = lab["alice"]
    message, counts, *_ = alice.predict(str(lab["shared"]), "train", "image", "text", api_name="/on_load")
    assert "4 images" in counts, (message, counts)
    message, *_ = alice.predict("HACKED", "", "", "", "", api_name="/on_apply")
    assert "shared folder" in message and "only reads it" in message
    message, *_ = alice.predict("HACKED caption", api_name="/lambda_6")  # the caption editor's Save
    assert "shared folder" in message
    unchanged(lab)


def test_9_a_yaml_alias_bomb_is_refused_at_once_with_a_short_message(lab):
    bomb = "a: &a [" + ",".join(['"lol"'] * 9) + "]\n"
    for x, y in zip("bcdefgh", "abcdefg"):
        bomb += f"{x}: &{x} [" + ",".join([f"*{y}"] * 9) + "]\n"
    log = lab["server"].log
    before = log.stat().st_size
    with pytest.raises(Exception) as e:
        lab["alice"].predict(bomb, api_name="/start_run")
    assert "anchors or aliases" in str(e.value) and len(str(e.value)) < 400
    for data in ["5", "[1, 2]", "just text", "train: [" + "1," * 100_000 + "]"]:
        with pytest.raises(Exception) as e:
            lab["alice"].predict(data, api_name="/start_run")
        assert len(str(e.value)) < 1500 and "exception was raised" not in str(e.value), str(e.value)[:300]
    assert log.stat().st_size - before < 100_000


def test_12_every_page_watching_a_run_gets_its_updates(lab):
    from gradio_client import Client

    alice = lab["alice"]
    # Alice's own run: her settings (shown back to her on a later page) must not carry Bob's secret.
    name = alice.predict(cfg(lab["shared"], "watched", steps=40, dataset={"caption_prefix": "alicecat"}),
                         api_name="/start_run")
    watchers = [Client(lab["server"].url, auth=("alice", "apple"), verbose=False) for _ in range(20)]
    jobs = [w.submit(name, api_name="/watch") for w in watchers]
    finals = [job.result(timeout=600) for job in jobs]
    assert all(f["state"] == "completed" for f in finals), finals
    assert all(len(job.outputs()) >= 2 for job in jobs)  # each was streamed to, not only told the end


def test_13_wrong_passwords_are_throttled_and_distinct_users_never_share_a_workspace(lab):
    import httpx

    url = lab["server"].url
    codes = [httpx.post(url + "login", data={"username": "carol", "password": f"guess{i}"}).status_code
             for i in range(12)]
    assert codes[:5] == [400] * 5 and set(codes[6:]) == {429}, codes
    r = httpx.post(url + "login", data={"username": "carol", "password": "cherry"})
    assert r.status_code == 429 and "Try again in" in r.text  # even the right password waits
    assert httpx.post(url + "login", data={"username": "dave", "password": "date"}).status_code == 200
    # A browser sends the login as multipart; a form may name several users (Gradio reads the last).
    codes = [httpx.post(url + "login", files={"username": (None, "erin"), "password": (None, f"guess{i}")}).status_code
             for i in range(6)]
    assert codes == [400] * 5 + [429], codes
    sneaky = httpx.post(url + "login", content=b"username=x1&username=erin&password=elder",
                        headers={"content-type": "application/x-www-form-urlencoded"})
    assert sneaky.status_code == 429

    from gradio_client import Client

    dot = Client(url, auth=("alice.", "dot"), verbose=False)
    theirs = Path(dot.predict(api_name="/on_demo"))
    assert theirs.parent.parent.name != "alice" and theirs.parent.parent.name.startswith("alice-")
    refused(dot, "bob-run", api_name="/watch", says="of yours")


def test_14_bad_input_gets_a_message_not_a_bare_exception(lab):
    alice = lab["alice"]
    message, *_ = alice.predict("/tmp/a\x00b", "train", "image", "text", api_name="/on_load")
    assert "not a usable path" in message
    refused(alice, cfg("/tmp/a\x00b", "nul"), api_name="/start_run", says="not a usable path")


def test_every_endpoint_with_bobs_paths_and_names_gives_nothing_of_his(lab):
    """Every API endpoint the app has (so also those added later), every text parameter one of Bob's paths
    or names: nothing of his comes back, and nothing of his changes."""
    bob_ws, lora = lab["bob_ws"], lab["lora"]
    values = [str(lora), "../../bob/runs/bob-run", str(bob_ws / "runs" / "bob-run"), "bob-run",
              str(bob_ws / "datasets" / "mine"), "runs/../../bob/runs/bob-run/bob-run.safetensors"]
    alice_ws = lab["server"].workspace / "users" / "alice"
    lab["alice"].predict(api_name="/on_demo")
    mine = set(tree(alice_ws).values())
    victim = {k: v for k, v in lab["bob_files"].items() if v not in mine}
    outcomes = sweep(lab["alice"], victim, values)
    assert len(outcomes) >= 40, sorted(outcomes)
    unchanged(lab)


def test_pages_of_other_sites_cannot_use_a_logged_in_users_cookie(lab):
    """Gradio's CORS answers any origin once the app is reached by a host name: the guard refuses
    requests that another site's page makes with the user's cookies."""
    import httpx

    url = lab["server"].url
    cookie = _login_cookie(url, "alice", "apple")
    own = next(Path(lab["alice"].predict(api_name="/on_demo")).glob("*.txt"))
    evil = {"Cookie": cookie, "Host": "lab.example.edu", "Origin": "https://evil.example"}
    assert httpx.get(f"{url}gradio_api/file={own}", headers=evil).status_code == 403
    r = httpx.post(f"{url}gradio_api/call/on_demo", json={"data": []}, headers=evil)
    assert r.status_code == 403 and "other sites" in r.text
    sneaky = {"Cookie": cookie, "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}  # another port, same host
    assert httpx.get(f"{url}gradio_api/file={own}", headers=sneaky).status_code == 403
    same = {"Cookie": cookie, "Origin": url.rstrip("/"), "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    assert httpx.get(f"{url}gradio_api/file={own}", headers=same).status_code == 200
    assert httpx.get(url, headers={"Cookie": cookie, "Sec-Fetch-Site": "cross-site",
                                   "Sec-Fetch-Mode": "navigate"}).status_code == 200  # a link from elsewhere


def test_a_shared_class_dataset_is_copied_into_the_callers_workspace_to_edit(lab):
    """The shared folder is read-only; *Copy into my workspace* gives Alice her own copy, without what links in
    the shared folder name (here Bob's files)."""
    alice, shared, server = lab["alice"], lab["shared"], lab["server"]
    message, *_ = alice.predict(str(shared), "train", "image", "text", api_name="/on_load")
    message, *_ = alice.predict("mine, ", "", "", "", "", api_name="/on_apply")
    assert "shared folder" in message and "Copy into my workspace" in message, message
    bobs = sorted((lab["bob_ws"] / "datasets" / "mine").iterdir())
    links = [shared / f"zz{p.suffix}" for p in bobs[:2]]
    for link, target in zip(links, bobs[:2]):
        link.symlink_to(target)
    hard = shared / "zz-hard.txt"  # another name for a file that may be anyone's: not copied either
    os.link(bobs[-1], hard)
    try:
        message, source, counts, *_ = alice.predict(str(shared), api_name="/on_copy")
    finally:
        for link in [*links, hard]:
            link.unlink()
    copy = Path(source)
    assert copy.parent == server.workspace / "users" / "alice" / "datasets" and "Copied" in message, message
    assert "4 images" in counts and sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in shared.iterdir())
    assert SECRET not in "".join(t.read_text() for t in copy.glob("*.txt"))
    message, *_ = alice.predict("mine, ", "", "", "", "", api_name="/on_apply")  # the copy is the loaded dataset
    assert message.startswith("Changed 4 of 4"), message
    assert all(t.read_text().startswith("mine, ") for t in copy.glob("*.txt"))
    message, *_ = alice.predict(str(copy), api_name="/on_copy")
    assert "in your workspace already" in message
    unchanged(lab)


def test_a_file_swapped_for_a_link_while_a_folder_is_copied_is_refused(tmp_path):
    """The copy opens each file again only if it is still the one its walk listed."""
    from trainer.errors import LoraLabError
    from ui.uploads import LOOSE, _Entry, _open_listed

    listed, secret = tmp_path / "a.txt", tmp_path / "secret.txt"
    listed.write_text("a caption")
    secret.write_text("someone else's")
    st = listed.stat()
    entry = _Entry(LOOSE, (), "a", ".txt", st.st_size, listed, ident=(st.st_dev, st.st_ino))
    with _open_listed(entry) as f:
        assert f.read() == b"a caption"
    listed.unlink()
    listed.symlink_to(secret)
    with pytest.raises(OSError):  # a link in its place is not followed
        _open_listed(entry)
    listed.unlink()
    os.link(secret, listed)  # another file under its name
    with pytest.raises(LoraLabError, match="changed while it was being copied"):
        _open_listed(entry)
