"""Base models load from every source, offline; families are detected; pickles are refused."""
import pytest
import torch
from safetensors.torch import save_file

from helpers import unet_output
from ldm_layout import save_sd15_single_file
from trainer.errors import LoraLabError
from trainer.models.detect import detect_single_file_family
from trainer.models.load import config_folder, load_base
from trainer.models.tiny import build_tiny, save_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny-sd15")


def test_diffusers_folder_loads_like_the_built_in_model(tiny_folder, tmp_path):
    m = load_base(str(tiny_folder))
    ref = load_base("tiny-random")
    assert m.family == "sd15" and m.prediction_type == "epsilon"
    assert torch.equal(unet_output(m.unet, m), unet_output(ref.unet, ref))
    xl = load_base(str(save_tiny(tmp_path / "xl", "tiny-random-xl")))
    assert xl.family == "sdxl" and len(xl.text_encoders) == 2


def test_single_file_checkpoint_is_detected_and_loads_offline(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "my_model.safetensors"
    save_sd15_single_file(build_tiny(), path)
    assert detect_single_file_family(path) == ("sd15", None)
    m = load_base(str(path), config_dir=str(tiny_folder))
    ref = load_base("tiny-random")
    assert m.family == "sd15"
    assert torch.equal(unet_output(m.unet, m), unet_output(ref.unet, ref))
    v = load_base(str(path), config_dir=str(tiny_folder), prediction_type="v_prediction")
    assert v.prediction_type == "v_prediction" and v.noise_scheduler().config.prediction_type == "v_prediction"


def _keys_only(path, keys):
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


def test_family_and_prediction_detection_from_keys(tmp_path):
    unet = "model.diffusion_model.input_blocks.0.0.weight"
    assert detect_single_file_family(_keys_only(tmp_path / "xl.safetensors", [
        unet, "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"])) == ("sdxl", None)
    sd2 = _keys_only(tmp_path / "v2.safetensors", [unet, "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"])
    assert detect_single_file_family(sd2) == ("sd2", "v_prediction")
    (tmp_path / "v2.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert detect_single_file_family(sd2) == ("sd2", "epsilon")
    lora = _keys_only(tmp_path / "l.safetensors", ["lora_unet_x.lora_down.weight"])
    with pytest.raises(LoraLabError, match="is a LoRA, not a base model"):
        detect_single_file_family(lora)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not a model")
    with pytest.raises(LoraLabError, match="not a readable .safetensors"):
        load_base(str(junk))


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(LoraLabError, match="pickle checkpoint.*run arbitrary code"):
        load_base(str(ckpt))


def test_missing_model_and_offline_hub_id_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(LoraLabError, match="was not found"):
        load_base(str(tmp_path / "nope.safetensors"))
    with pytest.raises(LoraLabError, match="not a diffusers model"):
        load_base(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraLabError, match="offline"):
        load_base("someone/some-model")


@pytest.mark.parametrize("family, unet_params, te_layers", [
    ("sd15", 859_520_964, [12]), ("sd2", 865_910_724, [23]), ("sdxl", 2_567_463_684, [12, 32])])
def test_shipped_offline_configs_describe_the_real_models(family, unet_params, te_layers):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    folder = config_folder(family)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    assert sum(p.numel() for p in unet.parameters()) == unet_params
    names = ["text_encoder", "text_encoder_2"][:len(te_layers)]
    assert [CLIPTextConfig.from_pretrained(folder / n).num_hidden_layers for n in names] == te_layers
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
