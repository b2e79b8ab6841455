"""Issue 17's proof: LoRA Lab's files give ComfyUI and sd-scripts the weight change that was trained.

For each family (SD 1.5, SDXL), algorithm (lora, dora, loha, lokr, oft), target set (attention, all)
and with or without text encoders, it builds a LoRA Lab file the way a run exports one (the
project's loader, `add_adapter`, `adapter_file_tensors`, `save_file_atomic`, on a full-size random
model from random_model.py) after giving every adapter weight small random values. The trained
change of each layer is what peft itself merges into it. Then each other tool's own loading code
reads the file and applies it to the same base weights:

- ComfyUI: `comfy.lora.model_lora_keys_unet` / `model_lora_keys_clip` build the key map as its
  LoraLoader does (`comfy.sd.load_lora_for_models`), `comfy.lora_convert.convert_lora` and
  `comfy.lora.load_lora` turn the file into patches, and `comfy.lora.calculate_weight` applies each
  patch as ModelPatcher does (fp32 copy of the weight, strength 1).
- sd-scripts (when its folder is given): `networks.lora.create_network_from_weights` for plain LoRA
  files and `lycoris.kohya.create_network_from_weights` for the rest (the module the file's
  `ss_network_module` names), then the network's `merge_to`, on the models sd-scripts builds from a
  diffusers folder (its own `original_unet` for SD 1.5, `sdxl_original_unet` for SDXL).

One row per file and tool: the keys in the file, those the tool loaded, the layers it changed, and
the relative error of the change (||applied - trained|| / ||trained||, max and mean over the trained
layers; a layer the tool did not change counts as 1). The table is printed and written as markdown
(--out) with a JSON copy beside it.

CI does not run this: it needs ComfyUI's and sd-scripts' source folders and full-size models. SD 1.5
with both tools peaks at 12-15 GB of memory (the model, sd-scripts' copy of it and, for targets=all,
every layer's trained change; OFT files hold whole weight differences), about 4 GB less without
sd-scripts. SDXL's fp32 UNet alone is ~10 GB. Run it in pieces, e.g.

    .venv/bin/python tests/bench/check_other_loaders.py /path/to/ComfyUI /path/to/sd-scripts --family sd15
    .venv/bin/python tests/bench/check_other_loaders.py /path/to/ComfyUI --family sdxl --targets attention \
        --algorithms lora,dora --out tests/bench/results/other_loaders_sdxl.md
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.abc
import importlib.machinery
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import common  # noqa: F401  (puts the repository on the import path)

import torch
from diffusers import UNet2DConditionModel  # noqa: F401  (imported before the stubs below: see stub_missing)
from transformers import CLIPTextModel  # noqa: F401

from trainer.adapters import ADAPTER, adapter_layers, add_adapter
from trainer.config import config_from_dict
from trainer.export import (adapter_file_tensors, layer_names, metadata, named_parts, network_module_and_args,
                            save_file_atomic)
from trainer.models.load import load_base

ALGORITHMS = ["lora", "dora", "loha", "lokr", "oft"]
TARGETS = ["attention", "all"]
# Packages ComfyUI and sd-scripts import at module level for parts this check never runs (video and
# audio models, samplers, T5 tokenizers, image augmentation): torchvision, torchaudio, scipy,
# sentencepiece, cv2. When one is not installed it is replaced by an empty stand-in module.
IMPORT_ONLY = {"torchvision", "torchaudio", "scipy", "sentencepiece", "cv2"}
# Each adapter weight gets N(0, (SCALE / sqrt(fan_in))^2): changes of about 1-10 % of a layer's weight.
SCALE = {"lora": 0.3, "dora": 0.3, "loha": 1.0, "lokr": 0.6, "oft": 0.3}


# --- cases and results ----------------------------------------------------------------------------------
@dataclass
class Case:
    family: str
    algorithm: str
    targets: str
    te: bool

    @property
    def name(self) -> str:
        return f"{self.family}-{self.algorithm}-{self.targets}-{'te' if self.te else 'unet'}"


@dataclass
class Row:
    family: str
    algorithm: str
    targets: str
    te: str
    tool: str
    file_keys: int
    keys_loaded: int | str
    layers_trained: int
    layers_changed: int | str
    max_rel_err: float | str
    mean_rel_err: float | str
    change_size: float  # mean ||trained change|| / ||base weight|| over the layers
    note: str = ""


@dataclass
class Trained:
    """The file and, per layer (its name in the file), the base weight and the adapted layer. The change
    peft merges is computed when asked (holding every layer's change would take as much memory as the
    UNet: SDXL would not fit beside sd-scripts' UNet in 24 GB)."""
    path: Path
    file_keys: list[str]
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[str, torch.nn.Module] = field(default_factory=dict)
    size: float = 0.0  # mean ||trained change|| / ||base weight||

    def change(self, key: str) -> torch.Tensor:
        return merged_change(self.layers[key])


# --- import-time stand-ins ------------------------------------------------------------------------------
class _ImportOnlyStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: answers only for IMPORT_ONLY packages no other finder has."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in IMPORT_ONLY:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__, module.__spec__, module.__name__ = [], spec, spec.name
        return module

    def exec_module(self, module):
        pass


def stub_missing(tool_dir: Path) -> None:
    """Put a tool's folder on the import path, with the stand-ins. diffusers and transformers are imported
    first (top of this file) so their "is torchvision installed" checks see the truth, not a stand-in."""
    if not any(isinstance(f, _ImportOnlyStub) for f in sys.meta_path):
        sys.meta_path.append(_ImportOnlyStub())
    if str(tool_dir) not in sys.path:
        sys.path.insert(0, str(tool_dir))


# --- building the files ---------------------------------------------------------------------------------
def case_config(case: Case, base: Path, rank: int, alpha: float):
    return config_from_dict({"name": case.name, "model": {"base": str(base)},
                             "network": {"algorithm": case.algorithm, "rank": rank, "alpha": alpha,
                                         "targets": case.targets, "train_text_encoder": case.te}})


def give_random_values(module: torch.nn.Module, algorithm: str, gen: torch.Generator) -> None:
    """Every adapter weight random (peft starts LoRA's B, LoHa's w2_b, LoKr's w1 and OFT at zero),
    DoRA's magnitude a few percent off the weight norm it starts at."""
    for _, layer in adapter_layers(module):
        for name, p in layer.named_parameters():
            if "base_layer" in name:
                continue
            if "lora_magnitude_vector" in name:
                p.data.mul_(1 + 0.05 * torch.randn(p.shape, generator=gen))
                continue
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.data = torch.randn(p.shape, generator=gen) * (SCALE[algorithm] / fan_in ** 0.5)


def merged_change(layer) -> torch.Tensor:
    """What peft adds to the base weight when it merges the adapter (the weight is put back after)."""
    weight = layer.get_base_layer().weight
    before = weight.data.clone()
    layer.merge(adapter_names=[ADAPTER])
    change = weight.data.float() - before.float()
    weight.data.copy_(before)
    layer.merged_adapters.clear()
    return change


def add_case_adapters(model, case: Case, cfg, gen: torch.Generator) -> None:
    add_adapter(model.unet, cfg.network)
    for te in (model.text_encoders if case.te else []):
        add_adapter(te, cfg.network, text_encoder=True)
    for _, module in named_parts(model):
        for p in module.parameters():
            p.requires_grad_(False)
        give_random_values(module, case.algorithm, gen)


def remove_adapters(model) -> None:
    """Put each wrapped layer's own module back, so the next case starts from the bare model."""
    for _, module in named_parts(model):
        for name, layer in adapter_layers(module):
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
        if hasattr(module, "peft_config"):  # what inject_adapter_in_model left on the model
            del module.peft_config


def write_case_file(model, case: Case, cfg, out_dir: Path, precision: str) -> Trained:
    """The file as a run exports it, and each layer's trained change."""
    tensors = adapter_file_tensors(model, case.family, case.algorithm, cfg.network.alpha)
    res = model.default_resolution
    meta = metadata(cfg, case.family, 1, [], 0, (res, res), prediction_type=model.prediction_type)
    path = save_file_atomic(tensors, out_dir / f"{case.name}.safetensors", meta, precision)
    trained = Trained(path, sorted(tensors))
    del tensors
    for prefix, module in named_parts(model):
        names = layer_names(model, prefix, module)
        for name, layer in adapter_layers(module):
            key = names[name]
            trained.base[key] = layer.get_base_layer().weight.data
            trained.layers[key] = layer
    sizes = [(trained.change(k).norm() / w.float().norm()).item() for k, w in trained.base.items()]
    trained.size = sum(sizes) / len(sizes)
    return trained


# --- comparing ------------------------------------------------------------------------------------------
def compare(case: Case, tool: str, trained: Trained, applied, keys_loaded: int, note: str = "") -> Row:
    """applied: (kohya name, change the tool made) for each trained layer it changed, one at a time so
    that only one layer's change is held."""
    errors = {key: 1.0 for key in trained.layers}  # a layer the tool never changes is off by its whole change
    changed = 0
    for key, got in applied:
        change = trained.change(key)
        errors[key] = ((got.float() - change).norm() / change.norm()).item()
        changed += int(got.abs().max() > 0)
    return Row(case.family, case.algorithm, case.targets, "yes" if case.te else "no", tool, len(trained.file_keys),
               keys_loaded, len(trained.layers), changed, max(errors.values()),
               sum(errors.values()) / len(errors), trained.size, note)


def failed_row(case: Case, tool: str, trained: Trained, error: Exception) -> Row:
    msg = f"{type(error).__name__}: {error}".splitlines()[0][:160]
    return Row(case.family, case.algorithm, case.targets, "yes" if case.te else "no", tool, len(trained.file_keys),
               "error", len(trained.layers), "-", "-", "-", trained.size, msg)


# --- ComfyUI --------------------------------------------------------------------------------------------
class ComfyStateDict:
    """The two things comfy.lora's key-map functions read from a ComfyUI model: `state_dict()` (its
    `diffusion_model.*` / `clip_l.*` / `clip_g.*` names) and, for the UNet, `model_config.unet_config`.
    Building the real ComfyUI model would need a second full copy of the weights; this holds the same
    tensors under ComfyUI's names."""

    def __init__(self, state: dict[str, torch.Tensor], model_config=None):
        self._state = state
        self.model_config = model_config

    def state_dict(self):
        return self._state


class LoraKeysNotLoaded(logging.Handler):
    """comfy.lora.load_lora reports each file key it did not use as a warning."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("lora key not loaded: "):
            self.keys.append(msg[len("lora key not loaded: "):])


class ComfyUI:
    name = "ComfyUI"

    def __init__(self, folder: Path, model):
        stub_missing(folder)
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # comfy.model_management otherwise asks for a CUDA device at import
        import comfy.lora
        import comfy.lora_convert
        import comfy.model_detection
        import comfy.utils

        self.comfy = comfy
        self.unet, self.clip = self._models(model)

    def _models(self, model) -> tuple[ComfyStateDict, ComfyStateDict]:
        """The UNet under ComfyUI's names, converted as comfy.sd.load_diffusion_model_state_dict converts
        a diffusers UNet, and the text encoders as ComfyUI's SD1/SDXL clip models name them."""
        comfy = self.comfy
        unet_sd = model.unet.state_dict()
        model_config = comfy.model_detection.model_config_from_diffusers_unet(unet_sd)
        to_ldm = comfy.utils.unet_to_diffusers(model_config.unet_config)
        unet = {f"diffusion_model.{to_ldm[k]}": unet_sd[k] for k in to_ldm if k in unet_sd}
        clip = {}
        for clip_name, te in zip(["clip_l", "clip_g"], model.text_encoders):
            for k, t in te.state_dict().items():
                k = k.removeprefix("text_model.")  # transformers 5 has no text_model level; ComfyUI does
                top = "" if k.startswith("text_projection") else "text_model."
                clip[f"{clip_name}.transformer.{top}{k}"] = t
        return ComfyStateDict(unet, model_config), ComfyStateDict(clip)

    def check(self, case: Case, trained: Trained) -> Row:
        """comfy.sd.load_lora_for_models's key map and patches, then ModelPatcher's calculate_weight."""
        comfy = self.comfy
        key_map = comfy.lora.model_lora_keys_unet(self.unet, {})
        key_map = comfy.lora.model_lora_keys_clip(self.clip, key_map)
        lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(trained.path), safe_load=True))
        not_loaded = LoraKeysNotLoaded()
        logging.getLogger().addHandler(not_loaded)
        try:
            patches = comfy.lora.load_lora(lora, key_map)
        finally:
            logging.getLogger().removeHandler(not_loaded)
        loaded = len(lora) - len(not_loaded.keys)
        note = f"not loaded: {not_loaded.keys[0]}" if not_loaded.keys else ""
        return compare(case, self.name, trained, self._applied(trained, key_map, patches), loaded, note)

    def _applied(self, trained: Trained, key_map: dict, patches: dict):
        weights = {**self.unet.state_dict(), **self.clip.state_dict()}
        for key in trained.layers:
            target = key_map.get(key)
            if target in patches and target in weights:
                base = weights[target].float()
                out = self.comfy.lora.calculate_weight([(1.0, patches[target], 1.0, None, None)], base.clone(), target)
                yield key, out - base


# --- sd-scripts -----------------------------------------------------------------------------------------
class WithTextModelLevel(torch.nn.Module):
    """sd-scripts pins transformers 4, whose CLIPTextModel keeps its layers under `text_model.`; it names
    LoRA modules after that path (`lora_te_text_model_encoder_…`). transformers 5 dropped the level from
    CLIPTextModel, so that text encoder is put back under one for sd-scripts to walk."""

    def __init__(self, te):
        super().__init__()
        self.text_model = te


class SdScripts:
    name = "sd-scripts"

    def __init__(self, folder: Path, model, lycoris_dir: Path | None = None):
        stub_missing(folder)
        if lycoris_dir:  # a LyCORIS source folder instead of the installed package
            sys.path.insert(0, str(lycoris_dir))
        import lycoris
        import lycoris.kohya
        import networks.lora

        self.modules = {"networks.lora": networks.lora, "lycoris.kohya": lycoris.kohya}
        self.lycoris_from = str(Path(lycoris.__file__).parent)
        self.family = model.family
        self.unet = self._unet(model)
        # Module copies that share the weight tensors (no second copy of the weights): each layer is
        # merged and put back one at a time, in check().
        self.text_encoders = []
        for te in model.text_encoders:
            te = copy.deepcopy(te, {id(t): t for t in te.state_dict(keep_vars=True).values()})
            # transformers 5's CLIPTextModelWithProjection (SDXL's second) still has its text_model level
            self.text_encoders.append(te if hasattr(te, "text_model") else WithTextModelLevel(te))

    def _unet(self, model):
        """The UNet sd-scripts trains on when given a diffusers folder (train_util._load_target_model and
        sdxl_train_util's diffusers branch), built on the meta device and given the model's own tensors."""
        c = model.unet.config
        state = model.unet.state_dict(keep_vars=True)
        if model.family == "sdxl":
            from library import sdxl_model_util, sdxl_original_unet

            with torch.device("meta"):
                unet = sdxl_original_unet.SdxlUNet2DConditionModel()
            state = sdxl_model_util.convert_diffusers_unet_state_dict_to_sdxl(state)
        else:
            from library.original_unet import UNet2DConditionModel as OriginalUNet

            with torch.device("meta"):
                unet = OriginalUNet(c.sample_size, c.attention_head_dim, c.cross_attention_dim,
                                    c.use_linear_projection, c.upcast_attention)
        unet.load_state_dict(state, assign=True)
        return unet

    def check(self, case: Case, trained: Trained, module_name: str) -> Row:
        """create_network_from_weights, then each module's own merge_to (what the network's merge_to
        runs for every module), one module at a time against its base weight."""
        te = self.text_encoders if self.family == "sdxl" else self.text_encoders[0]
        kwargs = {"for_inference": True} if module_name == "networks.lora" else {}
        network, weights_sd = self.modules[module_name].create_network_from_weights(
            1.0, str(trained.path), None, te, self.unet, **kwargs)
        loras = network.text_encoder_loras + network.unet_loras
        # sd-scripts names modules as the file does (SDXL files carry its SAI UNet names; networks.lora
        # would rename diffusers ones, LyCORIS would not).
        names = {lora.lora_name for lora in loras}
        loaded = sum(1 for k in trained.file_keys if k.split(".")[0] in names)
        merged = self._merged(loras, trained, weights_sd if module_name == "networks.lora" else None)
        return compare(case, f"{self.name} ({module_name})", trained, merged, loaded)

    def _merged(self, loras, trained: Trained, weights_sd: dict | None):
        """Each module merged by its own code, its change read, and the base weight (and bias) put back."""
        for lora in loras:
            key = lora.lora_name
            if key not in trained.base:  # cannot happen: modules are made for the file's names only
                raise RuntimeError(f"{lora.lora_name} was made but the file does not train it")
            org = self._org_module(lora)
            before = {n: t.detach().clone() for n, t in org.named_parameters(recurse=False)}
            if weights_sd is None:  # LyCORIS: LycorisNetwork.merge_to calls lora.merge_to(multiplier)
                lora.merge_to(1.0)
            else:  # networks.lora: LoRANetwork.merge_to hands each module its part of the file
                part = {k[len(key) + 1:]: v for k, v in weights_sd.items() if k.startswith(key)}
                lora.merge_to(part, torch.float32, "cpu")
            change = org.weight.data.float() - before["weight"].float()
            with torch.no_grad():
                for n, t in org.named_parameters(recurse=False):
                    t.copy_(before[n])
            yield key, change

    @staticmethod
    def _org_module(lora):
        ref = getattr(lora, "org_module_ref", None) or getattr(lora, "org_module", None)
        return ref[0] if isinstance(ref, (list, tuple)) else ref


# --- running --------------------------------------------------------------------------------------------
def cases(family: str, algorithms: list[str], targets: list[str], tes: list[bool]) -> list[Case]:
    return [Case(family, a, t, te) for a in algorithms for t in targets for te in tes]


def load_tools(args, model) -> list:
    tools = [ComfyUI(args.comfyui, model)]
    if args.sd_scripts:
        tools.append(SdScripts(args.sd_scripts, model, args.lycoris))
        print(f"lycoris.kohya from {tools[-1].lycoris_from}")
    return tools


def check_case(model, tools, case: Case, args, gen) -> list[Row]:
    cfg = case_config(case, args.model_dir(case.family), args.rank, args.alpha)
    add_case_adapters(model, case, cfg, gen)
    rows = []
    try:
        trained = write_case_file(model, case, cfg, args.files, args.precision)
        module = network_module_and_args(cfg.network)[0]  # the file's ss_network_module
        for tool in tools:
            sd_scripts = isinstance(tool, SdScripts)
            try:
                rows.append(tool.check(case, trained, module) if sd_scripts else tool.check(case, trained))
            except Exception as e:  # one tool failing on one file is a result, not the end of the run
                logging.exception("%s on %s", tool.name, case.name)
                rows.append(failed_row(case, f"{tool.name} ({module})" if sd_scripts else tool.name, trained, e))
            release_memory()
    finally:
        remove_adapters(model)
    return rows


def check_family(family: str, args, done: list[Row] = ()) -> list[Row]:
    """Every case of one family; the report is rewritten after each case (with the rows of `done` first), so
    a run the system stops for memory keeps what it measured."""
    from random_model import make_random_model

    folder = make_random_model(family, args.model_dir(family))
    model = load_base(str(folder))
    tools = load_tools(args, model)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for case in cases(family, args.algorithms, args.targets, args.te):
        t0 = time.time()
        new = check_case(model, tools, case, args, gen)
        for row in new:
            print_row(row)
        print(f"  ({case.name}: {time.time() - t0:.0f} s)", flush=True)
        rows += new
        write_report([*done, *rows], args)
        release_memory()
    del model, tools
    gc.collect()
    return rows


def release_memory() -> None:
    """Hand freed memory back to the system between files (glibc keeps it otherwise): the machine is shared."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


COLUMNS = ["family", "algorithm", "targets", "te", "tool", "file_keys", "keys_loaded", "layers_trained",
           "layers_changed", "max_rel_err", "mean_rel_err", "change_size", "note"]


def cell(value) -> str:
    return f"{value:.1e}" if isinstance(value, float) else str(value)


def print_row(row: Row) -> None:
    print(" | ".join(cell(getattr(row, c)) for c in COLUMNS), flush=True)


def write_report(rows: list[Row], args) -> None:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(getattr(r, c)) for c in COLUMNS) + " |" for r in rows]
    note = (f"Relative error: ||applied - trained|| / ||trained|| per trained layer (1 where the tool left a "
            f"layer unchanged). change_size: mean ||trained|| / ||base weight||. Files saved in {args.precision}, "
            f"rank {args.rank}, alpha {args.alpha}.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# LoRA Lab files in other loaders\n\n{common.machine()}, {time.strftime('%Y-%m-%d')}\n\n"
                        f"{note}\n\n" + "\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": common.machine(), "date": time.strftime("%Y-%m-%d"), "note": note, "command": sys.argv,
         "rows": [r.__dict__ for r in rows]}, indent=1))
    print(f"written {args.out} and {args.out.with_suffix('.json')}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("comfyui", type=Path, help="ComfyUI's source folder")
    ap.add_argument("sd_scripts", type=Path, nargs="?", help="sd-scripts' source folder (optional)")
    ap.add_argument("--lycoris", type=Path, help="a LyCORIS source folder to use instead of the installed lycoris")
    ap.add_argument("--family", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated subset of " + ",".join(ALGORITHMS))
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: attention, all")
    ap.add_argument("--te", default="no,yes", help="with text encoders: no, yes or both (no,yes)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=4.0, help="not the rank, so alpha scaling is tested")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                    help="file precision; fp32 leaves only the loaders' maths in the error")
    ap.add_argument("--models", type=Path, default=Path("/tmp/lora-lab-random"), help="random model cache")
    ap.add_argument("--files", type=Path, default=Path("/tmp/lora-lab-other-loaders"), help="where files go")
    ap.add_argument("--out", type=Path, default=common.OUT / "other_loaders.md")
    args = ap.parse_args(argv)
    args.family = args.family.split(",")
    args.algorithms = args.algorithms.split(",")
    args.targets = args.targets.split(",")
    args.te = [t == "yes" for t in args.te.split(",")]
    args.model_dir = lambda family: args.models / family
    args.files.mkdir(parents=True, exist_ok=True)
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(" | ".join(COLUMNS))
    rows = []
    for family in args.family:
        rows += check_family(family, args, rows)


if __name__ == "__main__":
    main()
