"""Sample scores from a CLIP model (a tiny one built in code): likeness to the training images, prompt
following, near-copies flagged; scored during training and in the Test tab's sweep, whose recommended
strength goes into the LoRA file; without a CLIP model the UI says what is needed."""
import json
from types import SimpleNamespace

import pytest
from PIL import Image
from safetensors import safe_open

from conftest import tiny_config
from tiny_clip import save_tiny_clip
from trainer.data.sources import load_dataset_source
from trainer.loop import run_job
from trainer.plan_summary import describe, plan
from trainer.scores import load_scorer, recommend_strength
from ui.live_panel import sample_items


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_a_sample_equal_to_a_training_image_is_flagged_as_a_near_copy(clip, demo_dir):
    scorer = load_scorer(str(clip))
    ds = load_dataset_source(str(demo_dir))
    ref = scorer.reference([item.load() for item in ds.items], [item.name for item in ds.items])
    copied = ds.items[2].load()
    other = Image.effect_noise((64, 64), 80).convert("RGB")
    same, noise = scorer.score([copied, other], ["lablora, a shape", "lablora, a shape"], ref)
    assert same.copy and same.nearest == ds.items[2].name and same.similarity > 0.999
    assert "near-copy of " + ds.items[2].name in same.caption()
    assert not noise.copy and "near-copy" not in noise.caption()
    assert -1 <= same.likeness <= 1 and -1 <= same.prompt <= 1


def test_training_scores_its_samples_and_the_gallery_shows_them(clip, demo_dir, tmp_path):
    prompts = ["lablora, a circle on a white background", "lablora, a square"]
    cfg = tiny_config(demo_dir, name="scored", **{"train.steps": 4, "sample.every_n_steps": 2, "sample.prompts": prompts,
                                                  "sample.score_model": str(clip)})
    run = run_job(cfg, tmp_path)
    rows = [json.loads(x) for x in (run.samples_dir / "scores.jsonl").read_text().splitlines()]
    assert [(r["step"], r["index"]) for r in rows] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    assert {"likeness", "prompt", "nearest", "similarity", "copy"} <= set(rows[0])
    assert "sample scores at step 4: likeness" in run.log_path.read_text()
    labels = [label for _, label in sample_items(run)]
    assert len(labels) == 4 and all(" · likeness " in label and " · prompt " in label for label in labels)


def test_a_clip_model_that_does_not_load_turns_scores_off_not_the_run(demo_dir, tmp_path):
    cfg = tiny_config(demo_dir, name="noclip", **{"train.steps": 2, "sample.prompts": ["lablora, a circle"],
                                                  "sample.score_model": str(tmp_path / "no-such-clip")})
    run = run_job(cfg, tmp_path)
    assert run.status()["state"] == "completed" and len(run.samples()) == 1
    assert "sample scores off for this run: The CLIP model" in run.log_path.read_text()


def test_check_settings_says_scores_need_a_clip_model(demo_dir, clip):
    cfg = tiny_config(demo_dir, **{"sample.prompts": ["lablora, a circle"]})
    text = describe(plan(cfg, None, on_cpu=True), None)
    assert "Sample scores: off. Scores need a CLIP model: set sample.score_model" in text
    cfg.sample.score_model = str(clip)
    assert f"Sample scores (likeness, prompt following, near-copies) with {clip}." in describe(plan(cfg, None, True), None)


def test_the_recommended_strength_is_the_lowest_with_most_of_the_likeness_and_the_prompt_kept():
    sweep = [(0.0, 0.50, 0.30), (0.25, 0.60, 0.30), (0.5, 0.68, 0.29), (0.75, 0.70, 0.28), (1.0, 0.70, 0.20)]
    assert recommend_strength(sweep)[0] == 0.5  # 0.18 of 0.20 gained, prompt within 0.02
    losing = [(0.0, 0.5, 0.30), (0.5, 0.55, 0.29), (1.0, 0.7, 0.20)]
    assert recommend_strength(losing) == (None, "every strength that reaches most of the likeness loses prompt following")
    flat = [(0.0, 0.5, 0.3), (1.0, 0.505, 0.3)]
    assert recommend_strength(flat)[0] is None


def test_the_sweep_writes_its_recommendation_into_the_file_and_picking_it_shows_it(clip, demo_dir, tmp_path):
    from ui.test_scores import picked_info, recommendation

    cfg = tiny_config(demo_dir, name="rec", **{"train.steps": 2})
    run = run_job(cfg, tmp_path / "ws")
    lora = run.lora_path("rec")
    scores = {0.0: (0.50, 0.30), 0.5: (0.68, 0.29), 1.0: (0.70, 0.20)}
    records = [{"strength": s, "score": {"likeness": like, "prompt": p}} for s, (like, p) in scores.items()]
    ctx = SimpleNamespace(workspace=tmp_path / "ws", space=False, per_user=False, local=True)
    note = recommendation(ctx, records, lora)
    assert note.startswith("**Recommended strength: 0.5**") and "written into rec.safetensors" in note
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["lora_lab_recommended_strength"] == "0.5" and f.metadata()["ss_steps"] == "2"
    assert picked_info(ctx, str(lora)).startswith("Recommended strength: **0.5**")
    # the sweep's images get no scores, and the page says what they need, without a CLIP model
    from ui.test_scores import score_records

    unscored = [{"image": Image.new("RGB", (64, 64)), "prompt": "lablora", "caption": "strength 0 · lablora"}]
    assert score_records(ctx, unscored, lora, "").startswith("Scores need a CLIP model: give a local CLIP folder")
    assert "score" not in unscored[0] and unscored[0]["caption"] == "strength 0 · lablora"
    uploaded = tmp_path / "uploaded.safetensors"  # a file that is not in a run folder: no training images
    assert "pick a LoRA made by a run" in score_records(ctx, unscored, uploaded, str(clip))
    elsewhere = SimpleNamespace(workspace=tmp_path / "other", space=False, per_user=False, local=True)
    assert "not written into rec.safetensors" in recommendation(elsewhere, records, lora)
