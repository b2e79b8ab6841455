"""Check settings warns about what would spoil a run before it starts: sample prompts without the
dataset's trigger word, and save or sample intervals longer than the run."""
from conftest import tiny_config
from trainer.plan_summary import plan


def summary(captions):
    return {"images": len(captions), "repeats": len(captions), "captions": captions, "sizes": [("64x64", len(captions))],
            "missing_captions": 0}


def test_sample_prompts_with_another_trigger_word_than_the_captions_are_warned_about(demo_dir):
    caps = [f"lablora, a {s} on a white background" for s in ("circle", "square", "cross", "triangle", "circle")]
    cfg = tiny_config(demo_dir, **{"sample.prompts": ["sks, a circle", "lablora, a square"]})
    warnings = " ".join(plan(cfg, summary(caps))["warnings"])
    assert "1 of 2 sample prompts lack the trigger word 'lablora'" in warnings and "sks, a circle" in warnings
    assert "No trigger word" not in warnings  # the captions carry one, though no prefix is set
    cfg = tiny_config(demo_dir, **{"sample.prompts": ["lablora, a circle"]})
    assert not any("trigger" in w for w in plan(cfg, summary(caps))["warnings"])
    cfg = tiny_config(demo_dir, **{"dataset.caption_prefix": "zxq", "sample.prompts": ["lablora, a circle"]})
    assert any("lack the trigger word 'zxq'" in w for w in plan(cfg, summary(caps))["warnings"])
    loose = ["a dog", "a cat on a mat", "a red car", "two birds", "a house"]
    assert any(w.startswith("No trigger word") for w in plan(tiny_config(demo_dir), summary(loose))["warnings"])


def test_intervals_longer_than_the_run_are_warned_about(demo_dir):
    cfg = tiny_config(demo_dir, **{"train.steps": 60, "save.every_n_steps": 500, "sample.every_n_steps": 100,
                                   "sample.prompts": ["lablora, a circle"]})
    warnings = plan(cfg, None)["warnings"]
    assert any("Checkpoints every 500 steps, but the run has 60" in w for w in warnings)
    assert any("Samples every 100 steps, but the run has 60" in w for w in warnings)
    cfg = tiny_config(demo_dir, **{"train.steps": 60, "save.every_n_steps": 20, "sample.every_n_steps": 30,
                                   "sample.prompts": ["lablora, a circle"]})
    assert plan(cfg, None)["warnings"] == []


def test_check_settings_says_what_sample_images_cost_and_warns_when_a_cpu_would_take_minutes(demo_dir):
    from trainer.config import resolve
    from trainer.plan_summary import describe

    lab = resolve("classroom-lab", extra={"model": {"base": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
                                             "sample": {"prompts": ["lablora, a photo", "lablora, a cat"]}})
    p = plan(lab, None, on_cpu=True)
    assert p["sampling"]["rounds"] == 4 and p["sampling"]["size"] == "512×512"  # the run's resolution
    text = describe(p, None)
    assert "Samples: 2 images × 20 steps at 512×512, 4 times" in text and "min on this CPU" in text
    assert any("each round of samples takes about" in w and "Stop works during sampling" in w for w in p["warnings"])
    assert "Estimated GPU memory, were it trained on a GPU (this machine trains on its CPU)" in text
    on_gpu = plan(lab, None, on_cpu=False)
    assert "min on this CPU" not in describe(on_gpu, None)
    assert "Estimated accelerator memory: about" in describe(on_gpu, None)
    assert not any("round of samples" in w for w in on_gpu["warnings"])
    demo = resolve("cpu-demo", extra={"dataset": {"source": str(demo_dir)}})
    assert not any("round of samples" in w for w in plan(demo, None, on_cpu=True)["warnings"])
    assert "under a minute on this CPU" in describe(plan(demo, None, on_cpu=True), None)  # not "about 0 min"
    heavy = resolve("cpu-demo", extra={"train": {"steps": 10}, "sample": {"every_n_steps": 1, "steps": 50}})
    assert any("as long as the training itself" in w for w in plan(heavy, None, on_cpu=True)["warnings"])


def test_check_settings_gives_the_file_size_and_says_what_oft_costs(demo_dir):
    over = {"model.base": "stable-diffusion-v1-5/stable-diffusion-v1-5", "network.targets": "all", "network.rank": 16}
    lora = plan(tiny_config(demo_dir, **over), None, on_cpu=False)
    oft = plan(tiny_config(demo_dir, **over, **{"network.algorithm": "oft"}), None, on_cpu=False)
    assert 10 < lora["file_mb"] < 100 and oft["file_mb"] > 1000  # fp32 tiny_config: 4 bytes per weight
    assert not any("OFT" in w for w in lora["warnings"])
    (said,) = [w for w in oft["warnings"] if "OFT" in w]
    assert f"{oft['file_mb']:,.0f} MB" in said and f"{lora['file_mb']:,.0f} MB for a LoRA of rank 16" in said


def test_an_adapter_start_that_the_algorithm_does_not_use_is_warned_about(demo_dir):
    said = {algorithm: [w for w in plan(tiny_config(demo_dir, **{"network.algorithm": algorithm,
                                                                 "network.init_weights": "kaiming"}), None)["warnings"]
                        if "init_weights" in w] for algorithm in ("lora", "dora", "loha", "lokr", "oft")}
    assert said["lora"] == said["dora"] == []
    for algorithm in ("loha", "lokr", "oft"):
        (line,) = said[algorithm]
        assert f"network.algorithm={algorithm}" in line and "not used" in line


def test_check_settings_warns_when_a_real_models_preset_is_left_on_the_demo_model(demo_dir):
    from trainer.config import resolve

    lab = resolve("classroom-lab", extra={"dataset": {"source": str(demo_dir)}})  # its base: the demo model
    assert lab.model.base.startswith("tiny-demo") and lab.dataset.resolution == 512
    assert any("tiny demo model that draws 64×64" in w and "cpu-demo" in w for w in plan(lab, None)["warnings"])
    demo = resolve("cpu-demo", extra={"dataset": {"source": str(demo_dir)}})
    assert not any("tiny demo model" in w for w in plan(demo, None)["warnings"])
