"""What the Test tab builds on: checkpoint LoRAs, the export bundle, the hub push without a network."""
import zipfile

import pytest
import torch
from PIL import Image

from conftest import tiny_config
from helpers import unet_output
from trainer.bundle import export_bundle
from trainer.checkpoint_lora import checkpoint_loras
from trainer.errors import LoraLabError
from trainer.lora_file import AppliedLoras
from trainer.loop import run_job
from trainer.models.load import load_base


@pytest.fixture(scope="module")
def finished_run(demo_dir, tmp_path_factory):
    cfg = tiny_config(demo_dir, name="ck", **{"train.steps": 4, "save.every_n_steps": 2, "save.keep_last": 5,
                                              "network.algorithm": "dora", "train.learning_rate": 1e-2})
    return run_job(cfg, tmp_path_factory.mktemp("ws"))


def test_every_checkpoint_becomes_a_lora_and_the_last_matches_the_final_file(finished_run):
    files = checkpoint_loras(finished_run.path)
    assert [s for s, _ in files] == [2, 4]
    base = load_base("tiny-random")
    applied = AppliedLoras(base, [(files[-1][1], 1.0)])
    from_checkpoint = unet_output(base.unet, base)
    applied.remove()
    AppliedLoras(base, [(finished_run.lora_path("ck"), 1.0)])
    assert torch.allclose(from_checkpoint, unet_output(base.unet, base), atol=1e-5)


@pytest.mark.parametrize("algorithm", ["loha", "dora"])
def test_checkpoint_loras_of_all_layer_runs_match_the_final_file(algorithm, demo_dir, tmp_path):
    """LoHa checkpoints carry alpha/rank folded in as the final file does; DoRA convolutions their 4-D magnitudes."""
    cfg = tiny_config(demo_dir, name="all", **{"train.steps": 2, "save.every_n_steps": 2, "network.targets": "all",
                                               "network.algorithm": algorithm, "train.learning_rate": 1e-2})
    run = run_job(cfg, tmp_path)
    (_, path), = checkpoint_loras(run.path)
    base = load_base("tiny-random")
    applied = AppliedLoras(base, [(path, 1.0)])
    from_checkpoint = unet_output(base.unet, base)
    applied.remove()
    AppliedLoras(base, [(run.lora_path("all"), 1.0)])
    assert torch.allclose(from_checkpoint, unet_output(base.unet, base), atol=1e-5)


def test_export_bundle_holds_what_a_lab_hands_in(finished_run, tmp_path):
    imgs = [("00_base.png", Image.new("RGB", (8, 8))), ("01_lora.png", Image.new("RGB", (8, 8), "red"))]
    out = export_bundle(tmp_path / "hand-in.zip", imgs, ["a prompt"], finished_run.lora_path("ck"),
                        finished_run.path, {"seed": 1})
    z = zipfile.ZipFile(out)
    assert set(z.namelist()) == {"images/00_base.png", "images/01_lora.png", "prompts.txt", "settings.json",
                                 "lora/ck.safetensors", "config.yaml", "loss.png", "metrics.jsonl"}
    assert z.read("prompts.txt").decode() == "a prompt\n"
    assert Image.open(z.open("loss.png")).size == (640, 360)


def test_hub_push_offline_is_a_clear_message_and_the_token_goes_nowhere(finished_run, monkeypatch):
    from trainer.hub import push_lora

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraLabError, match="offline|Could not reach"):
        push_lora(finished_run.lora_path("ck"), "me/my-lora", "hf_secret_token_123", [])
    for f in finished_run.path.rglob("*"):
        if f.is_file():
            assert b"hf_secret_token_123" not in f.read_bytes()
    with pytest.raises(LoraLabError, match="you/name"):
        push_lora(finished_run.lora_path("ck"), "not-a-repo", "t", [])


def test_the_comfyui_workflow_chains_base_lora_prompts_and_sampler_settings():
    from trainer.comfy_workflow import workflow_api

    g = workflow_api([{"base": "/models/v1-5.safetensors", "prompt": p, "negative": "blurry", "seed": 7, "steps": 20,
                       "guidance": 5.0, "width": 64, "height": 64, "sampler": "euler_a",
                       "loras": [("runs/x/x.safetensors", 0.8)]} for p in ["lablora, a circle", "lablora, a cross"]])
    kinds = [n["class_type"] for n in g.values()]
    assert kinds.count("KSampler") == 2 and kinds.count("SaveImage") == 2 and kinds.count("LoraLoader") == 1
    for node in g.values():  # every link names an existing node and one of its outputs
        for v in node["inputs"].values():
            if isinstance(v, list):
                assert v[0] in g and v[1] in (0, 1, 2)
    ck = next(n for n in g.values() if n["class_type"] == "CheckpointLoaderSimple")
    lora = next(n for n in g.values() if n["class_type"] == "LoraLoader")
    assert ck["inputs"]["ckpt_name"] == "v1-5.safetensors" and lora["inputs"]["lora_name"] == "x.safetensors"
    assert lora["inputs"]["strength_model"] == 0.8
    samplers = [n for n in g.values() if n["class_type"] == "KSampler"]
    assert {s["inputs"]["sampler_name"] for s in samplers} == {"euler_ancestral"}
    assert all(s["inputs"]["seed"] == 7 and s["inputs"]["cfg"] == 5.0 and s["inputs"]["steps"] == 20 for s in samplers)
    texts = {g[s["inputs"]["positive"][0]]["inputs"]["text"] for s in samplers}
    assert texts == {"lablora, a circle", "lablora, a cross"}
    assert all(g[s["inputs"]["model"][0]]["class_type"] == "LoraLoader" for s in samplers)


def test_the_session_export_names_every_image_and_each_checkpoint_lora_apart(finished_run, tmp_path):
    from trainer.bundle import session_files

    (_, first), (_, second) = checkpoint_loras(finished_run.path)
    final = finished_run.lora_path("ck")
    common = {"base": "tiny-demo", "negative": "", "seed": 3, "steps": 20, "guidance": 5.0, "sampler": "euler_a",
              "width": 64, "height": 64}
    records = [{**common, "image": Image.new("RGB", (64, 64)), "prompt": "lablora, a circle", "label": "base",
                "loras": []},
               {**common, "image": Image.new("RGB", (64, 64), "pink"), "prompt": "lablora, a circle",
                "label": "with LoRA", "loras": [(str(final), 1.0)]},
               {**common, "image": Image.new("RGB", (64, 64)), "prompt": "lablora, a cross", "label": "step 2",
                "loras": [(str(first), 0.8)]},
               {**common, "image": Image.new("RGB", (64, 64)), "prompt": "lablora, a cross", "label": "step 4",
                "loras": [(str(second), 0.8)]}]
    named, entries, loras = session_files(records)
    assert [n for n, _ in named] == ["000_lablora-a-circle_base.png", "001_lablora-a-circle_with-LoRA.png",
                                     "002_lablora-a-cross_step-2.png", "003_lablora-a-cross_step-4.png"]
    assert [name for _, name in loras] == ["ck.safetensors", "ck-step-000002.safetensors", "ck-step-000004.safetensors"]
    assert entries[2]["loras"] == [{"file": "ck-step-000002.safetensors", "strength": 0.8}]
    assert entries[1]["seed"] == 3 and entries[1]["width"] == 64 and entries[0]["loras"] == []
    out = export_bundle(tmp_path / "all.zip", named, ["lablora, a circle", "lablora, a cross"], final,
                        finished_run.path, {"images": entries}, None, [x for x in loras if x[0] != final])
    names = set(zipfile.ZipFile(out).namelist())
    assert {"lora/ck.safetensors", "lora/ck-step-000002.safetensors", "lora/ck-step-000004.safetensors"} <= names
    assert sum(n.startswith("images/") for n in names) == 4


def test_the_comfyui_canvas_workflow_is_the_api_graph_with_widgets_in_comfyuis_order():
    from trainer.comfy_workflow import workflow_api, workflow_ui

    one = {"base": "v1-5.safetensors", "negative": "blurry", "seed": 7, "steps": 20, "guidance": 5.0,
           "width": 64, "height": 64, "sampler": "euler_a"}
    api = workflow_api([{**one, "prompt": "lablora, a circle", "loras": [], "name": "000_base"},
                        {**one, "prompt": "lablora, a circle", "loras": [("ck.safetensors", 1.0)], "name": "001_lora"},
                        {**one, "prompt": "lablora, a cross", "loras": [("ck.safetensors", 1.0)], "name": "002_lora"}])
    kinds = [n["class_type"] for n in api.values()]
    assert kinds.count("CheckpointLoaderSimple") == 1 and kinds.count("LoraLoader") == 1  # shared
    assert kinds.count("KSampler") == 3 and kinds.count("EmptyLatentImage") == 1
    ui = workflow_ui(api)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(api) and ui["last_node_id"] == len(nodes) and ui["last_link_id"] == len(ui["links"])
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"] and nodes[src]["outputs"][src_slot]["type"] == typ
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id and nodes[dst]["inputs"][dst_slot]["type"] == typ
    links_in = sum(isinstance(v, list) for n in api.values() for v in n["inputs"].values())
    assert len(ui["links"]) == links_in
    samplers = [n for n in ui["nodes"] if n["type"] == "KSampler"]
    assert all(n["widgets_values"] == [7, "fixed", 20, 5.0, "euler_ancestral", "normal", 1.0] for n in samplers)
    saves = sorted(n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "SaveImage")
    assert saves == ["000_base", "001_lora", "002_lora"]
    lora = next(n for n in ui["nodes"] if n["type"] == "LoraLoader")
    assert lora["widgets_values"] == ["ck.safetensors", 1.0, 1.0]
    assert len({tuple(n["pos"]) for n in ui["nodes"]}) == len(nodes)  # no two nodes on top of each other
