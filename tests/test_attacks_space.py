"""A Space attacked by one of its visitors: Mallory goes after Vera's session and the server's caps.

Numbered as the findings of issue 14; each through the real server, with two visitors' cookies.
"""
from pathlib import Path

import pytest

from app_server import AppServer
from attack import SECRET, fetch, sweep, tree


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    server = AppServer(tmp_path_factory.mktemp("space-attacks") / "workspace", "--space",
                       env={"LORA_LAB_SPACE_MAX_STEPS": "20", "LORA_LAB_SPACE_MAX_UPLOAD_MB": "3",
                            "LORA_LAB_SPACE_MIN_FREE_MB": "64", "LORA_LAB_SPACE_MAX_QUEUE": "2",
                            "LORA_LAB_SPACE_MAX_SAMPLE_IMAGES": "6", "LORA_LAB_SPACE_MAX_CHECKPOINTS": "3"})
    from gradio_client import Client

    vera, mallory = Client(server.url, verbose=False), Client(server.url, verbose=False)  # each keeps its cookie
    demo = Path(vera.predict(api_name="/on_demo"))
    first = sorted(demo.glob("*.txt"))[0]
    first.write_text(first.read_text() + f" {SECRET}")
    name = vera.predict(f"name: vera\nmodel: {{base: tiny-random}}\ndataset: {{source: '{demo}', resolution: 64, "
                        f"bucketing: false, caption_prefix: {SECRET}}}\ntrain: {{steps: 3}}\n", api_name="/start_run")
    for update in vera.submit(name, api_name="/watch"):
        pass
    assert update["state"] == "completed", update
    ws = demo.parent.parent
    yield {"server": server, "vera": vera, "mallory": mallory, "ws": ws, "files": tree(ws),
           "lora": ws / "runs" / "vera" / "vera.safetensors"}
    server.stop()


def cfg(source, **over):
    lines = {"train": "{steps: 4}", "dataset": f"{{source: '{source}', resolution: 64, bucketing: false}}",
             **over}
    return "name: x\nmodel: {base: tiny-random}\n" + "".join(f"{k}: {v}\n" for k, v in lines.items())


def test_8_a_visitor_cannot_choose_whose_workspace_they_get(space):
    from gradio_client import Client

    no_cookie = Client(space["server"].url, verbose=False)
    no_cookie.cookies.clear()
    with pytest.raises(Exception, match="no visitor cookie"):
        no_cookie.predict(api_name="/on_demo")
    mallory = Client(space["server"].url, verbose=False)
    mallory.session_hash = space["vera"].session_hash  # Gradio's page session id, which the browser picks
    with pytest.raises(Exception):  # the guard refuses the join (403), or the handler "belongs to someone else"
        mallory.predict("vera", api_name="/open_run")
    with pytest.raises(Exception, match="no run 'vera' of yours"):
        space["mallory"].predict("vera", api_name="/watch")
    assert tree(space["ws"]) == space["files"]


def test_8_space_caps_bound_every_setting_that_multiplies_the_work(space):
    mallory = space["mallory"]
    demo = mallory.predict(api_name="/on_demo")
    prompts = "[" + ", ".join(["a"] * 1000) + "]"
    for over, says in [({"train": "{steps: 4, gradient_accumulation: 1024}"}, "images per step"),
                       ({"train": "{steps: 4, batch_size: 64}"}, "images per step"),
                       ({"dataset": f"{{source: '{demo}', resolution: 4096}}"}, "at most 1024 px"),
                       ({"dataset": f"{{source: '{demo}', repeats: 10000}}"}, "100 repeats"),
                       ({"sample": f"{{prompts: {prompts}, width: 4096}}"}, "px|sample images"),
                       ({"train": "{steps: 20}", "sample": "{prompts: [a, b, c], every_n_steps: 1}"}, "sample images"),
                       ({"train": "{steps: 500}"}, "at most 20 steps"),
                       ({"network": "{rank: 1024}"}, "ranks of at most 64"),
                       ({"train": "{steps: 20}", "validation": "{every_n_steps: 1, timesteps: 100}"},
                        "validation passes"),
                       ({"save": "{every_n_steps: 1}"}, "at most 3 checkpoints"),
                       ({"model": "{base: stabilityai/sdxl}"}, "only these models")]:
        with pytest.raises(Exception, match=says):
            mallory.predict(cfg(demo, **over), api_name="/start_run")
    message, *_ = mallory.predict("tiny-random", "\n".join(["a cat"] * 50), "", 1, 2, 7.0, 64, 64, "euler_a",
                                  None, None, None, 1, 1, 1, api_name="/on_generate")
    assert "too many" in message
    message, *_ = mallory.predict("tiny-random", "a cat", "", 1, 2, 7.0, 4096, 4096, "euler_a",
                                  None, None, None, 1, 1, 1, api_name="/on_generate")
    assert "out of range" in message
    for base in ["/etc", str(space["ws"]), "stabilityai/stable-diffusion-xl-base-1.0"]:
        message, *_ = mallory.predict(base, "a cat", "", 1, 2, 7.0, 64, 64, "euler_a", None, None, None, 1, 1, 1,
                                      api_name="/on_generate")
        assert "only these models" in message, message


def test_8_sample_now_and_save_now_stay_within_the_runs_caps(space):
    """Each click is more work for the shared device: only what the run's own plan leaves of the caps."""
    mallory = space["mallory"]
    demo = mallory.predict(api_name="/on_demo")
    name = mallory.predict(cfg(demo, train="{steps: 20}", sample="{prompts: [a circle, a cross], steps: 2}"),
                           api_name="/start_run")
    sampled = [mallory.predict(api_name="/sample_now") for _ in range(3)]  # 6 images at most: 2 planned, 2 × 2 more
    saved = [mallory.predict(api_name="/save_now") for _ in range(3)]  # 3 checkpoints at most: the last, 2 more
    for update in mallory.submit(name, api_name="/watch"):
        pass
    assert update["state"] == "completed", update
    assert all("will be" in m for m in sampled[:2] + saved[:2]), (sampled, saved)
    assert "at most 6 sample images" in sampled[2] and "used up" in sampled[2], sampled
    assert "at most 3 checkpoints" in saved[2] and "used up" in saved[2], saved
    run = next(space["server"].workspace.glob(f"sessions/*/runs/{name}"))
    assert 2 <= len(list((run / "samples").glob("*.png"))) <= 6


def test_8_an_adapter_file_over_the_cap_and_a_large_validation_folder_are_refused(tmp_path):
    from trainer.config import config_from_dict
    from trainer.errors import LoraLabError
    from ui.space import check_caps

    images = tmp_path / "images"
    images.mkdir()
    for i in range(41):
        (images / f"{i}.png").write_bytes(b"")  # counted by name, as the caps do before anything is read
    few = tmp_path / "few"
    few.mkdir()
    (few / "a.png").write_bytes(b"")
    base = {"model": {"base": "stabilityai/stable-diffusion-xl-base-1.0"}, "dataset": {"source": str(few)},
            "train": {"steps": 20}}
    for over, says in [({"network": {"algorithm": "oft", "targets": "all"}}, "adapter files of at most 256 MB"),
                       ({"network": {"rank": 64, "targets": "all", "train_text_encoder": True}}, "about 505 MB"),
                       ({"validation": {"source": str(images)}}, "validation on at most 40 images")]:
        with pytest.raises(LoraLabError, match=says):
            check_caps(None, config_from_dict({**base, **over}))
    check_caps(None, config_from_dict({**base, "network": {"rank": 32, "targets": "all"}}))  # 194 MB: allowed
    # kohya repeat folders multiply the work as dataset.repeats would
    (tmp_path / "kohya" / "3000000_cat").mkdir(parents=True)
    (tmp_path / "kohya" / "3000000_cat" / "a.png").write_bytes(b"")
    with pytest.raises(LoraLabError, match="at most 100 repeats .*3000000_cat"):
        check_caps(None, config_from_dict({**base, "dataset": {"source": str(tmp_path / "kohya")}}))
    # validation passes count the last step's measurement too: 8 images × 100 timesteps at steps 0, 30 and 40
    eight = tmp_path / "eight"
    eight.mkdir()
    for i in range(8):
        (eight / f"{i}.png").write_bytes(b"")
    long = {**base, "train": {"steps": 40}, "validation": {"source": str(eight), "every_n_steps": 30, "timesteps": 100}}
    with pytest.raises(LoraLabError, match=r"8 × 100 × 3"):
        check_caps(None, config_from_dict(long))


def test_an_export_zip_over_the_visitors_quota_is_not_kept(tmp_path, monkeypatch):
    """The images' size is known once the zip is written: one that does not fit is removed, nothing left behind."""
    import numpy as np
    from PIL import Image

    from trainer.errors import LoraLabError
    from ui.context import AppContext
    from ui.test_export import export_session

    monkeypatch.setenv("LORA_LAB_SPACE_MAX_UPLOAD_MB", "0.4")
    monkeypatch.setenv("LORA_LAB_SPACE_MIN_FREE_MB", "1")
    ctx = AppContext.create(tmp_path / "ws", space=True)
    noise = np.random.default_rng(0)

    def record(i):  # noise: a PNG that does not compress, 192 KB
        return {"image": Image.fromarray(noise.integers(0, 255, (256, 256, 3), dtype=np.uint8)), "prompt": f"p{i}",
                "label": "base", "loras": [], "base": "tiny-demo", "negative": "", "seed": i, "steps": 4,
                "guidance": 5.0, "sampler": "euler_a", "width": 256, "height": 256}

    with pytest.raises(LoraLabError, match="this export adds"):
        export_session(ctx, [record(i) for i in range(3)], None, 1.0)
    assert not list((ctx.root / "exports").iterdir()) and not list(ctx.root.glob(".export-*"))
    out, count = export_session(ctx, [record(0)], None, 1.0)
    assert count == 1 and out.parent == ctx.root / "exports" and out.stat().st_size > 190_000
    assert not list(ctx.root.glob(".export-*"))


def _cookie(client) -> str:
    return "; ".join(f"{k}={v}" for k, v in client.cookies.items())


def test_4_a_visitor_fetches_files_of_their_own_session_only(space):
    url, lora = space["server"].url, space["lora"]
    for route in ("file=", "file/"):
        assert fetch(url, lora, _cookie(space["vera"]), route) == 200
        assert fetch(url, lora, _cookie(space["mallory"]), route) == 403
        assert fetch(url, lora, "", route) == 403
        assert fetch(url, space["server"].workspace / ".visitor-secret", _cookie(space["vera"]), route) == 403


def test_8_uploads_and_captions_stay_within_the_visitors_quota(space, tmp_path):
    """LoRA uploads count against the upload total; captions can't be grown into a disk filler."""
    import torch
    from gradio_client import Client, handle_file
    from safetensors.torch import save_file

    visitor = Client(space["server"].url, verbose=False)
    own = Path(visitor.predict(api_name="/on_demo")).parent.parent
    message, counts, *_ = visitor.predict("datasets/demo", "train", "image", "text", api_name="/on_load")
    visitor.predict("", "", "circle", "x" * 250, "", api_name="/on_apply")
    for _ in range(6):  # each doubles the x's: 250, 500, … until refused
        message, *_ = visitor.predict("", "", "x", "xx", "", api_name="/on_apply")
        if "too long" in message:
            break
    assert "too long" in message, message
    assert max(len(t.read_text()) for t in own.rglob("*.txt")) <= 4000
    big = tmp_path / "big.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(400_000)}, str(big))  # 1.6 MB
    results = [visitor.predict(handle_file(str(big)), api_name="/on_upload_1")[0] for _ in range(3)]
    assert results[0].startswith("Added") and "at most 3" in results[-1], results


def test_every_endpoint_with_veras_paths_gives_nothing_of_hers(space):
    ws, lora = space["ws"], space["lora"]
    values = [str(lora), f"../{ws.name}/runs/vera", str(ws / "runs" / "vera"), "vera",
              str(ws / "datasets" / "demo"), f"../../sessions/{ws.name}/runs/vera/vera.safetensors"]
    own = Path(space["mallory"].predict(api_name="/on_demo")).parent.parent
    mine = set(tree(own).values())  # the demo dataset is the same for everyone: not a leak
    outcomes = sweep(space["mallory"], {k: v for k, v in space["files"].items() if v not in mine}, values, rotations=2)
    assert len(outcomes) >= 40
    assert tree(ws) == space["files"]


def test_8_a_visitor_queues_one_run_at_a_time(space):
    from gradio_client import Client

    visitor = Client(space["server"].url, verbose=False)
    demo = visitor.predict(api_name="/on_demo")
    first = visitor.predict(cfg(demo, train="{steps: 20}"), api_name="/start_run")
    with pytest.raises(Exception, match="takes 1 at a time"):
        visitor.predict(cfg(demo), api_name="/start_run")
    for update in visitor.submit(first, api_name="/watch"):
        pass
    assert update["state"] == "completed"
    second = visitor.predict(cfg(demo), api_name="/start_run")  # once it has ended, the next is taken
    for update in visitor.submit(second, api_name="/watch"):
        pass
    assert update["state"] == "completed"


def test_8_fresh_cookies_do_not_fill_the_queue_and_uploads_need_the_page(space):
    """Cookies cost nothing: the queue as a whole is capped, and Gradio's upload route wants a visitor."""
    import httpx
    from gradio_client import Client

    visitors = [Client(space["server"].url, verbose=False) for _ in range(4)]
    demos = [v.predict(api_name="/on_demo") for v in visitors]
    names = [v.predict(cfg(d, train="{steps: 20}"), api_name="/start_run") for v, d in zip(visitors[:3], demos)]
    with pytest.raises(Exception, match="The demo is busy: 2 runs are waiting"):
        visitors[3].predict(cfg(demos[3]), api_name="/start_run")
    for v, name in zip(visitors, names):
        for update in v.submit(name, api_name="/watch"):
            pass
    r = httpx.post(space["server"].url + "gradio_api/upload", files={"files": ("x.bin", b"x" * 1000)})
    assert r.status_code == 403 and "visitor cookie" in r.text


def test_5_another_visitors_page_session_reaches_nothing(space):
    import httpx

    url, vera = space["server"].url, space["vera"]
    mallory = {"Cookie": _cookie(space["mallory"])}
    page = vera.session_hash
    assert httpx.get(f"{url}gradio_api/deep_link", params={"session_hash": page}, headers=mallory).status_code == 404
    assert httpx.get(f"{url}gradio_api/queue/data", params={"session_hash": page}, headers=mallory).status_code == 403
    assert httpx.get(f"{url}gradio_api/heartbeat/{page}", headers=mallory).status_code == 403
    r = httpx.post(f"{url}gradio_api/cancel", json={"session_hash": page, "fn_index": 0, "event_id": "x"},
                   headers=mallory)
    assert r.status_code == 403
    # A cookie in an odd format set beside the visitor's own changes nothing (no new identity, files still served).
    odd = {"Cookie": 'foo="x; ' + _cookie(vera)}
    assert fetch(url, space["lora"], odd["Cookie"]) == 200
