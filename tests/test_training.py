"""Each adapter trains; files reload to the trained output; resume and continue keep the curve."""
import json

import pytest
import torch

from conftest import tiny_config
from helpers import fixed_batch_loss, stopper, trained_model, unet_output
from trainer.data.demo import make_demo_dataset
from trainer.lora_file import AppliedLoras, load_into_diffusers
from trainer.loop import run_job
from trainer.models.load import load_base


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("one") / "d", count=1, size=64)


@pytest.mark.parametrize("algorithm", ["lora", "dora", "loha", "lokr", "oft"])
def test_each_adapter_learns_and_its_file_reloads_to_the_trained_output(algorithm, one_image, tmp_path):
    lr = {"oft": 3e-2}.get(algorithm, 1e-2)
    cfg = tiny_config(one_image, name=f"learn-{algorithm}", **{"network.algorithm": algorithm,
                      "network.targets": "attention_ff", "train.steps": 30, "train.learning_rate": lr})
    run = run_job(cfg, tmp_path)
    assert run.status()["state"] == "completed"
    lora = run.lora_path("learn-" + algorithm)
    caption = "lablora, a red circle, plain background"

    base = load_base("tiny-random")
    before = fixed_batch_loss(base, one_image, caption)
    applied = AppliedLoras(base, [(lora, 1.0)])
    after = fixed_batch_loss(base, one_image, caption)
    assert after < before * 0.9, (before, after)

    trained = trained_model(run)
    expect = unet_output(trained.unet, trained)
    got = unet_output(base.unet, base)
    assert torch.allclose(got, expect, atol=1e-4), (got - expect).abs().max()
    applied.remove()
    assert not torch.allclose(unet_output(base.unet, base), expect, atol=1e-4)


@pytest.mark.parametrize("algorithm,targets", [("lora", "attention"), ("dora", "attention"), ("lora", "all"),
                                               ("dora", "all")])
def test_diffusers_load_lora_weights_reproduces_the_trained_model(algorithm, targets, demo_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from trainer.models.tiny import build_tiny

    cfg = tiny_config(demo_dir, name="ext", **{"network.algorithm": algorithm, "network.rank": 4,
                      "network.targets": targets,
                      "network.alpha": 1.5, "network.train_text_encoder": True, "train.steps": 6,
                      "train.learning_rate": 1e-2})
    run = run_job(cfg, tmp_path)
    path = run.lora_path("ext")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alpha = f.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert alpha.item() == 1.5 and meta["ss_network_alpha"] == "1.5" and meta["ss_network_dim"] == "4"
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert all(".lora_down.weight" in k or ".lora_up.weight" in k or k.endswith((".alpha", ".dora_scale"))
               for k in keys)
    assert (algorithm == "dora") == any(k.endswith(".dora_scale") for k in keys)

    trained = trained_model(run)
    expect = unet_output(trained.unet, trained)

    pipe = StableDiffusionPipeline(**build_tiny("tiny-random"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if algorithm == "lora":
        pipe.load_lora_weights(str(path))  # the file as it is, as any diffusers user would load it
    else:
        load_into_diffusers(pipe, path)  # diffusers drops dora_scale from kohya files; see its docstring
    fresh = load_base("tiny-random")
    got = unet_output(pipe.unet, fresh, text_encoders=[pipe.text_encoder])
    assert torch.allclose(got, expect, atol=1e-4), (got - expect).abs().max()


def test_resume_after_stop_matches_an_uninterrupted_run(demo_dir, tmp_path):
    over = {"train.steps": 12, "save.every_n_steps": 4, "dataset.flip": True, "dataset.caption_dropout": 0.2,
            "network.dropout": 0.1}
    full = run_job(tiny_config(demo_dir, name="full", **over), tmp_path)
    part = run_job(tiny_config(demo_dir, name="part", **over), tmp_path, *stopper(7))
    st = part.status()
    assert st["state"] == "stopped" and st["step"] == 7  # honoured within one step
    assert (part.checkpoints_dir / "step-000007" / "state.json").exists()
    assert not part.lora_path("part").exists()
    run_job(tiny_config(demo_dir, name="part", **over), tmp_path, run=part)
    assert part.status()["state"] == "completed"
    a = [round(r["loss"], 6) for r in full.metrics()]
    b = [round(r["loss"], 6) for r in part.metrics()]
    assert [r["step"] for r in part.metrics()] == list(range(1, 13))
    assert a == b


def test_continuing_from_a_lora_file_carries_its_step_count(demo_dir, tmp_path):
    first = run_job(tiny_config(demo_dir, name="first", **{"train.steps": 5}), tmp_path)
    path = first.lora_path("first")
    second = run_job(tiny_config(demo_dir, name="second", **{"train.steps": 3, "network.init_from": str(path)}),
                     tmp_path)
    st = second.status()
    assert st["state"] == "completed" and st["step"] == 8
    assert [r["step"] for r in second.metrics()] == [6, 7, 8]
    from safetensors import safe_open

    with safe_open(str(second.lora_path("second")), "pt") as f:
        assert f.metadata()["ss_steps"] == "8"


def test_second_run_reuses_the_cache(demo_dir, tmp_path):
    run_job(tiny_config(demo_dir, name="one", **{"train.steps": 1}), tmp_path)
    again = run_job(tiny_config(demo_dir, name="two", **{"train.steps": 1}), tmp_path)
    log = again.log_path.read_text()
    assert "latents: 0 encoded, 6 read from the cache" in log
    assert "text embeddings: 0 encoded" in log


def test_tiny_sdxl_run_trains_and_exports(demo_dir, tmp_path):
    cfg = tiny_config(demo_dir, name="xl", **{"model.base": "tiny-random-xl", "train.steps": 4,
                      "network.train_text_encoder": True, "sample.prompts": ["a red circle"],
                      "train.learning_rate": 1e-2})
    run = run_job(cfg, tmp_path)
    assert run.status()["state"] == "completed"
    assert len(run.samples()) == 1
    from safetensors import safe_open

    with safe_open(str(run.lora_path("xl")), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    trained = trained_model(run)
    expect = unet_output(trained.unet, trained)
    base = load_base("tiny-random-xl")
    AppliedLoras(base, [(run.lora_path("xl"), 1.0)])
    assert torch.allclose(unet_output(base.unet, base), expect, atol=1e-4)


def test_run_folder_contents_and_events(demo_dir, tmp_path):
    events = []
    cfg = tiny_config(demo_dir, name="folder", **{"train.steps": 4, "save.every_n_steps": 2, "save.keep_last": 1,
                      "sample.every_n_steps": 2, "sample.prompts": ["lablora, a red circle"]})
    run = run_job(cfg, tmp_path, events.append)
    names = {p.name for p in run.path.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "status.json", "samples", "checkpoints", "folder.safetensors"} <= names
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step-000004"]
    rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and all({"loss", "lr"} <= set(r) for r in train_rows)
    # the validation loss (6 images: measured on the training images) before the start and at each checkpoint
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [0, 2, 4] and {r["val_on"] for r in val_rows} == {"training images"}
    kinds = [e.kind for e in events]
    assert kinds.count("step") == 4 and kinds.count("sample") == 2 and kinds.count("validation") == 3
    assert kinds[-1] == "status"
    step = next(e for e in events if e.kind == "step").data
    assert {"step", "total", "loss", "lr", "speed", "eta"} <= set(step)
    assert len(run.samples()) == 2
