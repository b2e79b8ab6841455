"""The training form, built from the config's own fields: every option, with its hint, in one place."""
from __future__ import annotations

import dataclasses

import gradio as gr

from trainer.config import SECTIONS, Config, config_from_dict, field_specs
from trainer.errors import LoraLabError

# Shown up front; everything else sits in folded groups per section.
COMMON = ["name", "model.base", "dataset.caption_prefix", "dataset.resolution", "network.algorithm",
          "network.rank", "network.alpha", "train.steps", "train.learning_rate", "train.batch_size",
          "train.optimizer", "save.every_n_steps", "sample.every_n_steps", "sample.prompts"]
HIDDEN = {"dataset.source", "dataset.split", "dataset.image_column", "dataset.caption_column"}  # from the Dataset tab
LABELS = {"name": "Run name", "model.base": "Base model", "dataset.caption_prefix": "Trigger word (caption prefix)",
          "sample.prompts": "Sample prompts (one per line)", "save.every_n_steps": "Save a checkpoint every N steps",
          "sample.every_n_steps": "Sample every N steps", "model.weight_dtype": "Store the base weights as",
          "train.checkpoint_depth": "Checkpoint depth", "train.offload": "Offload to CPU memory",
          "train.offload_blocks": "Blocks kept on the GPU (offload=blocks)", "train.ema": "EMA of the adapter weights",
          "train.ema_decay": "EMA decay", "train.ema_every": "EMA every N steps", "train.ema_on_cpu": "EMA in CPU memory",
          "train.fused_lora": "Fused LoRA attention (fewer GPU launches)", "train.fast_norms": "Norms in bf16 (fewer GPU launches)"}


def _num(v) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:g}"


def _component(key: str, f: dataclasses.Field, value, base_models: list[str]):
    meta = f.metadata
    label = label_of(key)
    common = dict(label=label, info=meta.get("hint"), elem_id="cfg-" + key.replace(".", "-").replace("_", "-"))
    if key == "model.base":
        return gr.Dropdown(base_models, value=value, allow_custom_value=True, **common)
    if meta.get("choices"):
        return gr.Dropdown(meta["choices"], value=value, **common)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, **common)
    if isinstance(value, list):
        return gr.Textbox(value="\n".join(value), lines=3, **common)
    if isinstance(value, (int, float)):
        # No minimum/maximum on the component: Gradio would refuse a value out of range in a pop-up that
        # names no field and turn the outputs red. The config check names the field and its range, in
        # the message under the buttons; the range is shown under the box.
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and hi is not None:
            span = f"{_num(lo)} to {_num(hi)}"
            common["info"] = f"{common['info']} ({span})" if common["info"] else span
        return gr.Number(value=value, precision=0 if isinstance(value, int) else None, **common)
    return gr.Textbox(value=value, **common)


def all_keys() -> list[tuple[str, dataclasses.Field]]:
    out = [("name", dataclasses.fields(Config)[0])]
    for section in SECTIONS:
        out += [(f"{section}.{f.name}", f) for f in field_specs(section)]
    return [(k, f) for k, f in out if k not in HIDDEN]


def _value(cfg: Config, key: str):
    if key == "name":
        return cfg.name
    sec, k = key.split(".")
    return getattr(getattr(cfg, sec), k)


def build_form(base_models: list[str], cfg: Config | None = None) -> dict:
    """Components keyed by 'section.key'; common ones first, then one folded group per section."""
    cfg = cfg or Config()
    comps, specs = {}, dict(all_keys())
    with gr.Group():
        with gr.Row():
            for key in COMMON[:4]:
                comps[key] = _component(key, specs[key], _value(cfg, key), base_models)
        with gr.Row():
            for key in COMMON[4:10]:
                comps[key] = _component(key, specs[key], _value(cfg, key), base_models)
        with gr.Row():
            for key in COMMON[10:]:
                comps[key] = _component(key, specs[key], _value(cfg, key), base_models)
    for section in SECTIONS:
        rest = [(k, f) for k, f in all_keys() if k.startswith(section + ".") and k not in COMMON]
        with gr.Accordion(f"More {section} options", open=False):
            for i in range(0, len(rest), 3):
                with gr.Row():
                    for key, f in rest[i:i + 3]:
                        comps[key] = _component(key, f, _value(cfg, key), base_models)
    return comps


def label_of(key: str) -> str:
    """The label of a config key's box in the form."""
    return LABELS.get(key, key.split(".")[-1].replace("_", " ").capitalize())


def form_to_config(keys: list[str], values: list, dataset: dict) -> Config:
    """Form values (+ the Dataset tab's source and columns) → a validated Config."""
    data: dict = {"dataset": dict(dataset)}
    for key, v in zip(keys, values):
        if isinstance(v, float) and v.is_integer() and isinstance(dict(all_keys())[key].default, int):
            v = int(v)
        if key == "name":
            data["name"] = v
            continue
        sec, k = key.split(".")
        data.setdefault(sec, {})[k] = v
    try:
        return config_from_dict(data)
    except LoraLabError as e:  # "train.steps: 0 is out of range": the form names the field as its box does
        key, _, rest = e.problem.partition(":")
        if key not in keys or not rest:
            raise
        raise LoraLabError(f"{label_of(key)} ({key}):{rest}", e.fix) from None


def config_to_values(cfg: Config, keys: list[str]) -> list:
    out = []
    for key in keys:
        v = _value(cfg, key)
        out.append("\n".join(v) if isinstance(v, list) else v)
    return out
