"""A LoRA Lab file describes itself with the metadata kohya's files carry (AUTOMATIC1111/Forge, civitai, ComfyUI)."""
import hashlib
import json

from safetensors import safe_open
from safetensors.torch import save

from conftest import tiny_config
from trainer.data.demo import make_demo_dataset
from trainer.loop import run_job


def test_the_file_carries_modelspec_kohya_keys_and_sd_scripts_hashes(tmp_path):
    make_demo_dataset(tmp_path / "data" / "3_lablora", count=2, size=64)
    make_demo_dataset(tmp_path / "data" / "1_style", count=3, size=64)
    cfg = tiny_config(tmp_path / "data", name="meta", **{"dataset.caption_prefix": "lablora", "network.targets": "all",
                                                        "network.algorithm": "dora", "train.steps": 2})
    run = run_job(cfg, tmp_path / "ws")
    path = run.lora_path("meta")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.title"] == "meta" and meta["modelspec.trigger_phrase"] == "lablora"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.date"][:4].isdigit() and "T" in meta["modelspec.date"]
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == "lora" and args["dora_wd"] == "True" and args["conv_dim"] == "4"
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_lablora": {"n_repeats": 3, "img_count": 2},
                                                   "1_style": {"n_repeats": 1, "img_count": 3}}
    assert meta["ss_num_train_images"] == "9"
    tags = json.loads(meta["ss_tag_frequency"])
    assert set(tags) == {"3_lablora", "1_style"} and tags["3_lablora"]["lablora"] == 2
    assert abs(float(meta["ss_training_started_at"]) - run.status()["started"]) < 1
    # sd-scripts' hashes, recomputed here from the file as written: the tensor bytes after the header,
    # and 64 KiB from 1 MiB on in the file serialised with its ss_* metadata alone.
    raw = path.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    again = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(again[0x100000:0x110000]).hexdigest()[:8]


def test_the_legacy_hash_reads_64_kib_from_1_mib_on_as_sd_scripts_does():
    """The tiny model's files are under 1 MiB (their legacy hash is that of nothing): a 4 MiB file shows it."""
    import torch

    from trainer.export import safetensors_hashes

    data = {"lora_unet_x.lora_down.weight": torch.arange(1 << 20, dtype=torch.float32)}
    meta = {"ss_network_dim": "4", "modelspec.title": "not hashed"}
    raw = save(data, {"ss_network_dim": "4"})
    model_hash, legacy = safetensors_hashes(data, meta)
    assert legacy == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8] != hashlib.sha256(b"").hexdigest()[:8]
    assert model_hash == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()


def test_plain_lora_names_kohyas_module_with_its_conv_rank():
    from trainer.config import Config
    from trainer.export import network_module_and_args

    net = Config().network
    net.targets = "all"
    assert network_module_and_args(net) == ("networks.lora", {"conv_dim": "16", "conv_alpha": "16.0"})
    net.algorithm, net.targets = "loha", "attention"
    assert network_module_and_args(net) == ("lycoris.kohya", {"algo": "loha", "preset": "attn-only"})
