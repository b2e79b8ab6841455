"""Everything before the first step: model, data, caches, adapter, optimizer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .adapters import adapter_layers, adapter_parameters, add_adapter, load_adapter_state, skip_input_casts
from .cache import LatentCache, TextCache
from .checkpointing import units, wrap_units
from .data.plan import Example, epoch_batches, plan_examples
from .data.sources import Dataset, load_dataset_source
from .errors import LoraLabError
from .lora_file import read_lora
from .memory_meter import PhaseMeter
from .models.load import BaseModel, load_base
from .offload import BlockOffloader, move_except
from .optim import make_optimizer, make_scheduler
from .validation import HELD_OUT, OWN_FOLDER, TRAINING, Validator, hold_out


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LoraLabError(f"train.device {name!r} is not a device.", "Use auto, cpu, cuda, cuda:1 or mps.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoraLabError("train.device asks for CUDA, but no CUDA GPU is available.",
                           "Use train.device=auto or cpu, or install a CUDA build of PyTorch.")
    return dev


def model_multiple(model: BaseModel) -> int:
    """Image sides must be divisible by this: the VAE's and the UNet's downsampling together."""
    return model.vae_scale * 2 ** (len(model.unet.config.block_out_channels) - 1)


@dataclass
class Prepared:
    model: BaseModel
    dataset: Dataset
    examples: list[Example]
    latents: LatentCache
    text: TextCache | None
    params: list[torch.nn.Parameter]
    optimizer: object
    scheduler: object
    batches_per_epoch: int
    start_step: int = 0
    notes: list[str] = field(default_factory=list)
    validator: Validator | None = None
    offloader: BlockOffloader | None = None


def load_data(cfg, model: BaseModel) -> tuple[Dataset, list[Example]]:
    d = cfg.dataset
    ds = load_dataset_source(d.source, d.split, d.image_column, d.caption_column, d.caption_extension)
    examples = plan_examples(ds, d, model_multiple(model))
    total = sum(e.repeats for e in examples)
    if cfg.train.batch_size > total:
        raise LoraLabError(f"train.batch_size {cfg.train.batch_size} is larger than the dataset "
                           f"({total} images × repeats).", f"Use a batch size of at most {total}, or add images.")
    return ds, examples


def cast(module: torch.nn.Module, device, dtype) -> None:
    """Move and cast a diffusers model. diffusers 0.42's `ModelMixin.to` warns "modules … should be kept
    in float32: []" on every cast, even when that list is empty; torch's own `to` does the same move
    without printing that to every run's log."""
    torch.nn.Module.to(module, device, dtype)


def encode_latents(cfg, model, ds, examples, cache_dir: Path, device, log, flip: bool) -> tuple[list[Example], LatentCache]:
    """Latents of `examples` (unreadable images left out, and listed among the dataset's problems)."""
    d = cfg.dataset
    cast(model.vae, device, torch.float32)  # fp32: the SDXL VAE overflows in fp16
    latents = LatentCache(cache_dir, model, "crop" if d.bucketing else d.resize, d.cache_latents)
    bad = latents.fill(ds, examples, flip, device, ds.problems)
    model.vae.to("cpu")
    if bad:
        for n in bad:
            log(f"skipped unreadable image {ds.items[examples[n].index].name}")
        keep = [n for n in range(len(examples)) if n not in set(bad)]
        latents.data = {(keep.index(n), f): v for (n, f), v in latents.data.items() if n in keep}
        examples = [examples[n] for n in keep]
    return examples, latents


def fill_caches(cfg, model, ds, examples, cache_dir: Path, device, log,
                more_captions: list[str] = ()) -> tuple[list[Example], LatentCache, TextCache | None]:
    """Encode latents (and frozen text embeddings); the encoders then leave the accelerator."""
    examples, latents = encode_latents(cfg, model, ds, examples, cache_dir, device, log, cfg.dataset.flip)
    if not examples:
        raise LoraLabError("None of the dataset's images could be read.", "See the problems listed for each file.")
    log(f"latents: {latents.encoded} encoded, {latents.reused} read from the cache")
    text = None
    if text_is_cached(cfg):
        text = TextCache(cache_dir, model, True)  # each encoder comes to the device in turn and leaves
        text.fill([e.caption for e in examples] + list(more_captions) + [""], device)
        if cfg.train.offload == "none":  # they stay on the device, for the samples
            for te in model.text_encoders:
                te.to(device)
        log(f"text embeddings: {text.encoded} encoded, {text.reused} read from the cache")
    else:
        for te in model.text_encoders:
            te.to(device)
    return examples, latents, text


def text_is_cached(cfg) -> bool:
    d = cfg.dataset
    return d.cache_text_embeddings and not cfg.network.train_text_encoder and not d.shuffle_tags


PEFT_SUFFIX = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
               "dora_scale": "lora_magnitude_vector"}


def init_from_file(path: str, model: BaseModel, alpha: float) -> int:
    """Load an existing LoRA file into the freshly added adapter; returns its step count."""
    from .export import kohya_key, named_parts

    from .lora_formats import canonical

    tensors, meta = read_lora(Path(path))
    tensors, _ = canonical(tensors, meta, model)  # diffusers, peft and ComfyUI files continue too
    loaded = 0
    for prefix, module in named_parts(model):
        names = {kohya_key(prefix, n): n for n, _ in adapter_layers(module)}
        state = {}
        for key, t in tensors.items():
            base, _, suffix = key.partition(".")
            if base not in names or suffix == "alpha":
                continue
            if suffix == "lora_up.weight" and f"{base}.alpha" in tensors:
                t = t * (tensors[f"{base}.alpha"].item() / alpha)  # keep the file's effective scale
            state[f"{names[base]}.{PEFT_SUFFIX.get(suffix, suffix)}"] = t
        if state:
            try:
                load_adapter_state(module, state)
            except RuntimeError as e:
                raise LoraLabError(f"{Path(path).name} does not match the network settings ({e}).".split("\n")[0],
                                   "Use the same network.algorithm and network.rank as the file.")
            loaded += len(state)
    if not loaded:
        raise LoraLabError(f"{Path(path).name} has no weights for the layers being trained.",
                           "Continue from a LoRA made for this base model with the same network.targets.")
    return int(meta.get("ss_steps", "0") or 0)


def storage_dtype(cfg, compute: torch.dtype) -> torch.dtype | None:
    """The format model.weight_dtype stores the frozen weights in, when it is not the training precision."""
    from .base_weights import STORAGE

    storage = STORAGE.get(cfg.model.weight_dtype)
    return storage if storage is not None and storage != compute else None


def setup_adapters(cfg, model: BaseModel, device, weight_dtype, log=print):
    """Adapters added, base weights stored and placed; returns (parameter groups, start step, BlockOffloader
    or None)."""
    from .base_weights import store_weights

    net, t = cfg.network, cfg.train
    storage = storage_dtype(cfg, weight_dtype)
    offload = t.offload == "blocks"
    # a UNet stored in another format is converted in CPU memory and moved once: the card never holds both
    cast(model.unet, "cpu" if storage or offload else device, weight_dtype)
    for te in model.text_encoders:  # frozen ones only sample (or encode each step): half the memory
        te.to(dtype=weight_dtype)
    if weight_dtype == torch.bfloat16:  # latents are cached: the VAE only decodes samples now. bf16 has
        model.vae.to(dtype=weight_dtype)  # fp32's range; in fp16 SDXL's VAE overflows, so it stays fp32
    add_adapter(model.unet, net)
    if weight_dtype != torch.float32:  # the UNet then always runs under autocast
        skip_input_casts(model.unet, net.algorithm)
    tes = model.text_encoders if net.train_text_encoder else []
    for te in tes:
        te.to(device, weight_dtype)
        add_adapter(te, net, text_encoder=True)
    start = init_from_file(net.init_from, model, net.alpha) if net.init_from else 0
    for m in [model.unet, *tes]:
        for p in adapter_parameters(m):
            p.data = p.data.float()  # trainable weights stay fp32 under mixed precision
    if storage:  # after the adapters exist: they are never stored coarsely
        stored = [store_weights(m, storage, weight_dtype) for m in [model.unet, *tes]]
        log(f"base weights stored as {cfg.model.weight_dtype}, computed in {str(weight_dtype)[6:]}: "
            f"{sum(n for n, _ in stored)} layers, {sum(b for _, b in stored) / 1024**2:,.1f} MB saved")
    fast_paths(cfg, model.unet, weight_dtype, log)
    offloader = place_unet(cfg, model.unet, device, log) if offload else None
    if storage and not offload:
        torch.nn.Module.to(model.unet, device)
    if t.gradient_checkpointing and not offload:
        wrap_units(model.unet, t.checkpoint_depth, checkpointed=True)
    if t.gradient_checkpointing or offload:
        for te in tes:
            te.gradient_checkpointing_enable()
    lr = cfg.train.learning_rate
    groups = [{"params": adapter_parameters(model.unet), "lr": lr}]
    for te in tes:
        groups.append({"params": adapter_parameters(te), "lr": net.text_encoder_lr or lr})
    return groups, start, offloader


def fast_paths(cfg, unet, weight_dtype, log=print) -> list[str]:
    """train.fused_lora and train.fast_norms: the same training in fewer operators per step (issue 20)."""
    from . import fast_norms, fused_lora

    done, net, t = [], cfg.network, cfg.train
    if t.fused_lora and net.algorithm == "lora" and not net.dropout:
        plan = fused_lora.install(unet)
        if plan:
            done.append(f"fused LoRA ({len(plan.layers)} layers in {len(plan.groups)} groups)")
    if t.fast_norms and weight_dtype == torch.bfloat16:
        done.append(f"{fast_norms.install(unet)} norms in bf16")
    if done:
        log("fewer launches per step: " + ", ".join(done))
    return done


def place_unet(cfg, unet, device, log) -> BlockOffloader:
    """offload=blocks: the blocks' frozen weights to (pinned) CPU memory, the rest to the device; the blocks
    are checkpointed (their weights are gone after they ran) and brought back by the offloader as they run."""
    t = cfg.train
    blocks = units(unet, t.checkpoint_depth)
    offloader = BlockOffloader(blocks, device, t.offload_blocks)
    move_except(unet, device, blocks)
    wrap_units(unet, t.checkpoint_depth, checkpointed=True, on_enter=offloader.enter)
    unet.register_forward_pre_hook(lambda *_: offloader.new_pass())
    log(f"offload: {len(blocks) - len(offloader.keep)} of the UNet's {len(blocks)} blocks "
        f"({offloader.bytes_on_host() / 1024**3:.2f} GB) wait in CPU memory and are copied to the device as they run"
        + ("" if t.gradient_checkpointing else " (with gradient checkpointing, which offloading needs)"))
    return offloader


def prepare(cfg, workspace: Path, device, weight_dtype, log, processes: int = 1, meter: PhaseMeter | None = None) -> Prepared:
    m = cfg.model
    model = load_base(m.base, m.family, m.prediction_type, m.allow_pickle, m.config_dir)
    log(f"base model: {m.base} ({model.family}, {model.prediction_type})")
    ds, examples = load_data(cfg, model)
    log(f"dataset: {len(ds.items)} images ({ds.layout}), {len(ds.problems)} problems")
    for p in ds.problems:
        log(f"  problem: {p}")
    cache = Path(workspace) / "cache"
    own = validation_folder(cfg, model, log) if cfg.validation.enabled and cfg.validation.source else None
    meter = meter or PhaseMeter(torch.device("cpu"))
    meter.start("caching")
    examples, latents, text = fill_caches(cfg, model, ds, examples, cache, device, log,
                                          [e.caption for e in own[1]] if own else [])
    examples, latents, validator = split_validation(cfg, model, examples, latents, text, own, cache, device, log)
    meter.start("loading")
    groups, start, offloader = setup_adapters(cfg, model, device, weight_dtype, log)
    meter.start(None)
    opt = make_optimizer(cfg.train.optimizer, groups, cfg.train.learning_rate, cfg.train.weight_decay, device)
    sched = make_scheduler(cfg.train.lr_scheduler, opt, cfg.train.warmup_steps, cfg.train.steps)
    bpe = len(epoch_batches(examples, cfg.train.batch_size * processes, cfg.train.seed, 0))
    params = [p for g in groups for p in g["params"]]
    return Prepared(model, ds, examples, latents, text, params, opt, sched, bpe, start, validator=validator,
                    offloader=offloader)


def validation_folder(cfg, model, log) -> tuple[Dataset, list[Example]]:
    v, d = cfg.validation, cfg.dataset
    vds = load_dataset_source(v.source, d.split, d.image_column, d.caption_column, d.caption_extension)
    vexamples = plan_examples(vds, d, model_multiple(model))
    for problem in vds.problems:
        log(f"  validation problem: {problem}")
    return vds, vexamples


def split_validation(cfg, model, examples, latents, text, own, cache: Path, device, log):
    """(training examples, their latents, the Validator or None): a held-out share, a folder of its own,
    or the training images themselves when there are too few to spare any."""
    v = cfg.validation
    if not v.enabled:
        return examples, latents, None
    if own:
        vexamples, vlatents = encode_latents(cfg, model, own[0], own[1], cache, device, log, flip=False)
        if not vexamples:
            raise LoraLabError(f"None of the images in validation.source {v.source} could be read.",
                               "See the problems in the log, or leave validation.source empty.")
        return examples, latents, Validator(vexamples, vlatents, text, model, v.timesteps, cfg.train.seed, OWN_FOLDER)
    held = hold_out(len(examples), v, cfg.train.seed)
    kept = [n for n in range(len(examples)) if n not in set(held)]
    if held and sum(examples[n].repeats for n in kept) < cfg.train.batch_size:
        log(f"validation: no images held out (train.batch_size {cfg.train.batch_size} needs them all)")
        held, kept = [], list(range(len(examples)))
    if not held:
        return examples, latents, Validator(examples, latents, text, model, v.timesteps, cfg.train.seed, TRAINING)
    held_latents = SimpleNamespace(data={(i, False): latents.data[(n, False)] for i, n in enumerate(held)})
    position = {n: i for i, n in enumerate(kept)}
    latents.data = {(position[n], f): e for (n, f), e in latents.data.items() if n in position}
    vexamples = [examples[n] for n in held]
    return ([examples[n] for n in kept], latents,
            Validator(vexamples, held_latents, text, model, v.timesteps, cfg.train.seed, HELD_OUT))

