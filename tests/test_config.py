import pytest
import yaml

from trainer.config import Config, config_from_dict, list_presets, load, parse_set, preset_dict, resolve
from trainer.errors import LoraLabError


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = Config()
    cfg.train.learning_rate = 3e-4
    cfg.sample.prompts = ["a", "b"]
    cfg.write(tmp_path / "c.yaml")
    again = load(tmp_path / "c.yaml")
    assert again == cfg


def test_required_key_names_exist():
    data = yaml.safe_load(Config().to_yaml())
    for key in ["model.base", "model.family", "dataset.source", "dataset.split", "dataset.image_column",
                "dataset.caption_column", "dataset.resolution", "dataset.resize", "dataset.bucketing",
                "dataset.repeats", "dataset.caption_prefix", "network.algorithm", "network.rank", "network.alpha",
                "train.steps", "train.batch_size", "train.learning_rate", "train.optimizer", "train.lr_scheduler",
                "train.loss", "train.mixed_precision", "train.gradient_checkpointing", "train.seed",
                "save.every_n_steps", "save.keep_last", "sample.every_n_steps", "sample.prompts"]:
        sec, k = key.split(".")
        assert k in data[sec], key
    assert "name" in data


@pytest.mark.parametrize("data, named, says", [
    ({"train": {"learnin_rate": 1}}, "train.learnin_rate", "learning_rate"),
    ({"trian": {}}, "trian", "train"),
    ({"train": {"steps": "many"}}, "train.steps", "whole number"),
    ({"train": {"steps": 0}}, "train.steps", "out of range"),
    ({"train": {"learning_rate": "fast"}}, "train.learning_rate", "number"),
    ({"network": {"algorithm": "lorax"}}, "network.algorithm", "lora, dora, loha, lokr, oft"),
    ({"dataset": {"resize": "squash"}}, "dataset.resize", "stretch"),
    ({"dataset": {"bucketing": "maybe"}}, "dataset.bucketing", "true or false"),
    ({"network": {"rank": -4}}, "network.rank", "out of range"),
    ({"train": "fast"}, "train", "section"),
])
def test_bad_configs_are_refused_naming_the_key(data, named, says):
    with pytest.raises(LoraLabError) as e:
        config_from_dict(data)
    assert named in str(e.value) and says in str(e.value)


def test_set_values_are_typed_and_override_file_and_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\n  learning_rate: 0.5\nnetwork:\n  rank: 8\n")
    cfg = resolve("cpu-demo", f, ["train.steps=9", "network.train_text_encoder=true", "name=my run"])
    assert cfg.train.steps == 9 and cfg.train.learning_rate == 0.5 and cfg.network.rank == 8
    assert cfg.network.train_text_encoder is True and cfg.name == "my run"
    assert cfg.model.base == "tiny-demo"  # from the preset
    assert parse_set(["sample.prompts=[a, b]"]) == {"sample": {"prompts": ["a", "b"]}}
    with pytest.raises(LoraLabError, match="section.key=value"):
        parse_set(["train.steps"])


def test_every_preset_resolves_to_a_valid_config():
    presets = list_presets()
    assert "cpu-demo" in presets
    for name, description in presets.items():
        assert description, f"preset {name} has no description"
        resolve(name)
        assert "description" in preset_dict(name)
    with pytest.raises(LoraLabError, match="Unknown preset"):
        resolve("no-such-preset")


@pytest.mark.parametrize("preset,card_gb", [("sd15-8gb", 8), ("sd15-12gb", 12), ("sdxl-12gb", 12),
                                            ("sdxl-24gb", 24), ("classroom-lab", 8), ("sdxl-6gb", 6),
                                            ("sd15-4gb", 4)])
def test_a_preset_for_a_card_is_estimated_to_fit_it_with_sampling_on(preset, card_gb):
    from trainer.plan_summary import estimate_memory_gb

    cfg = resolve(preset)
    cfg.sample.prompts = cfg.sample.prompts or ["a photo"]
    family = "sdxl" if preset.startswith("sdxl") else "sd15"
    assert estimate_memory_gb(cfg, family) < card_gb * 0.9  # room for other programs on the card
    cfg.train.gradient_checkpointing, cfg.train.batch_size = False, 16
    assert estimate_memory_gb(cfg, family) > card_gb  # the estimate does react to what costs memory


def test_a_preset_of_ones_own_keeps_the_settings_not_the_data_and_cannot_shadow_a_shipped_one(tmp_path):
    from trainer.config import save_preset

    own = tmp_path / "ws" / "presets"
    cfg = resolve("cpu-demo", sets=["train.steps=77", "network.rank=8", "dataset.source=/data/dogs", "name=dogs"])
    path = save_preset(cfg, own, "my dogs", "rank 8 for dogs")
    saved = yaml.safe_load(path.read_text())
    assert saved["description"] == "rank 8 for dogs" and "name" not in saved and "source" not in saved["dataset"]
    assert list(list_presets(own))[-1] == "my dogs" and list_presets(own)["my dogs"] == "rank 8 for dogs"
    again = resolve("my dogs", own_presets=own)
    assert again.train.steps == 77 and again.network.rank == 8 and again.dataset.source == ""
    assert "my dogs" not in list_presets()  # another workspace does not see it
    with pytest.raises(LoraLabError, match="comes with LoRA Lab"):
        save_preset(cfg, own, "cpu-demo")
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(LoraLabError, match="cannot be a preset name"):
            save_preset(cfg, own, bad)
    assert sorted(p.name for p in own.iterdir()) == ["my dogs.yaml"]
