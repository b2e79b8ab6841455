import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["LORA_LAB_CACHE"] = str(tmp_path_factory.mktemp("lora-lab-cache"))
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from trainer.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", count=6, size=64)


def tiny_config(source, **over):
    """A config for the tiny model that trains in seconds; `over` maps 'section.key' to values."""
    from trainer.config import config_from_dict, merge

    data = {
        "name": "t",
        "model": {"base": "tiny-random"},
        "dataset": {"source": str(source), "resolution": 64, "bucket_min_side": 32, "bucket_max_side": 128,
                    "bucket_step": 16},
        "network": {"rank": 4, "alpha": 2},
        "train": {"steps": 10, "learning_rate": 1e-3, "mixed_precision": "fp32", "device": "cpu"},
        "save": {"every_n_steps": 0, "precision": "fp32"},
        "sample": {"steps": 2},
    }
    for key, value in over.items():
        if "." in key:
            sec, k = key.split(".")
            data = merge(data, {sec: {k: value}})
        else:
            data[key] = value
    return config_from_dict(data)
