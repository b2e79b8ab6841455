"""Training on small cards: base weights stored in fp8/fp16 (model.weight_dtype), adapters in bypass form,
gradient checkpointing at two depths, blocks offloaded to CPU memory (train.offload=blocks), and EMA."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from helpers import stopper
from trainer.adapters import add_adapter, adapter_layers, adapter_parameters
from trainer.base_weights import StoredConv2d, StoredLinear, store_weights
from trainer.checkpointing import units, wrap_units
from trainer.config import NetworkConfig, resolve
from trainer.encode import encode_text
from trainer.lora_file import read_lora
from trainer.loop import run_job
from trainer.models.load import load_base
from trainer.offload import BlockOffloader
from trainer.sampling import generate


def adapted_unet(algorithm="lora", targets="all", seed=0):
    """The tiny demo UNet (fp32) with an adapter whose weights are random (an untrained one adds nothing)."""
    torch.manual_seed(seed)
    model = load_base("tiny-demo")
    add_adapter(model.unet, NetworkConfig(algorithm=algorithm, targets=targets, rank=4, alpha=4))
    for p in adapter_parameters(model.unet):
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


def step_inputs(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    emb, _ = encode_text(model, ["lablora, a circle", "a square"], "cpu")
    return x, torch.tensor([10, 500]), emb


def adapter_grads(model, steps=2):
    x, t, emb = step_inputs(model)
    model.unet.train()
    for _ in range(steps):
        model.unet(x, t, emb).sample.square().mean().backward()
    return [p.grad.clone() for p in adapter_parameters(model.unet)]


@pytest.mark.parametrize("algorithm", ["lora", "dora", "loha", "lokr", "oft"])
def test_bypass_adapters_compute_what_the_merged_weights_compute(algorithm):
    model = adapted_unet(algorithm)
    x, t, emb = step_inputs(model)
    with torch.no_grad():
        bypass = model.unet(x, t, emb).sample
        base = [m.get_base_layer().weight.detach().clone() for _, m in adapter_layers(model.unet)]
        for _, layer in adapter_layers(model.unet):
            layer.merge()
        merged = model.unet(x, t, emb).sample
        changed = [not torch.equal(b, m.get_base_layer().weight) for b, (_, m) in zip(base, adapter_layers(model.unet))]
    assert all(changed)  # the merge did change every layer: the two outputs are two computations
    assert (bypass - merged).abs().max().item() < 1e-5


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16])
def test_stored_base_weights_compute_and_backpropagate_like_the_rounded_weights(storage):
    """A base stored coarsely gives the outputs and adapter gradients of an fp32 model whose weights were rounded
    to that format: the upcast happens layer by layer, forward and backward, and nothing else changes."""
    stored, rounded = adapted_unet(), adapted_unet()
    layers, saved = store_weights(stored.unet, storage, torch.float32)
    assert layers > 50 and saved > 0
    assert any(isinstance(m, StoredConv2d) for m in stored.unet.modules())
    assert any(isinstance(m, StoredLinear) for m in stored.unet.modules())
    for (_, a), (_, b) in zip(stored.unet.named_modules(), rounded.unet.named_modules()):
        if isinstance(a, (StoredLinear, StoredConv2d)):
            assert a.weight.dtype == storage and not a.weight.requires_grad
            b.weight.data = b.weight.data.to(storage).float()
    assert stored.unet.conv_in.weight.dtype == torch.float32  # the first and last layers keep their precision
    ga, gb = adapter_grads(stored), adapter_grads(rounded)
    assert max((a - b).abs().max().item() for a, b in zip(ga, gb)) < 1e-6


def test_an_fp8_base_trains_and_its_lora_draws_the_same_on_the_ordinary_base(tmp_path):
    from trainer.data.demo import make_demo_dataset
    from trainer.demo.evaluate import concept_cases, concept_share

    data = make_demo_dataset(tmp_path / "data")
    prompts = ["lablora, a circle on a white background", "lablora, a square on a gray background"]
    cfg = resolve("cpu-demo", extra={"name": "fp8", "dataset": {"source": str(data)},
                                     "model": {"weight_dtype": "fp8_e4m3fn"}, "save": {"every_n_steps": 0},
                                     "sample": {"every_n_steps": 0, "prompts": prompts}})
    run = run_job(cfg, tmp_path / "ws")
    losses = [r["loss"] for r in run.metrics()]
    assert np.mean(losses[-30:]) < np.mean(losses[:30])
    log = (run.path / "log.txt").read_text()
    assert "base weights stored as fp8_e4m3fn, computed in float32" in log
    _, meta = read_lora(run.lora_path("fp8"))
    assert meta["ss_network_module"] == "networks.lora"  # the same file as ever, for an ordinary base
    # the run's last samples were drawn by the fp8 model being trained; the file on the fp32 base draws them again
    trained = [np.asarray(Image.open(p), dtype=float) for p in sorted(run.samples_dir.glob("*.png"))]
    base = load_base("tiny-demo")
    s, res = cfg.sample, cfg.dataset.resolution
    again = generate(base, prompts, s.seed, s.steps, s.guidance_scale, res, res, s.negative_prompt, s.scheduler,
                     loras=[(run.lora_path("fp8"), 1.0)])
    plain = generate(base, prompts, s.seed, s.steps, s.guidance_scale, res, res, s.negative_prompt, s.scheduler)
    for t, a, p in zip(trained, again, plain):
        same, other = np.abs(t - np.asarray(a)).mean(), np.abs(t - np.asarray(p)).mean()
        assert same < 0.25 * other, (same, other)  # measured: 8 and 5 against 138 and 59 (of 255)
    drawn = []
    for prompt, seed in concept_cases(12):
        drawn += generate(base, [prompt], seed=seed, steps=20, guidance_scale=5.0, loras=[(run.lora_path("fp8"), 1.0)])
    assert concept_share(drawn) >= 0.5  # it learned the concept (fp32 base: 58-92 %, README)


@pytest.mark.parametrize("depth", ["block", "layer"])
def test_checkpointing_and_offloading_blocks_give_the_same_gradients(depth):
    reference = adapter_grads(adapted_unet())
    checkpointed = adapted_unet()
    wrap_units(checkpointed.unet, depth, checkpointed=True)
    assert max((a - b).abs().max().item() for a, b in zip(reference, adapter_grads(checkpointed))) == 0
    offloaded = adapted_unet()
    blocks = units(offloaded.unet, depth)
    off = BlockOffloader(blocks, "cpu", keep=1, record=True)
    wrap_units(offloaded.unet, depth, checkpointed=True, on_enter=off.enter)
    assert max((a - b).abs().max().item() for a, b in zip(reference, adapter_grads(offloaded))) == 0
    # the schedule: every block is on the device when it runs, at most one more (the next) comes meanwhile,
    # and each block's copy is dropped again: its weights are the CPU copy once more
    on, runs = set(), []
    for action, i in off.log:
        if action in ("load", "prefetch"):
            on.add(i)
        elif action == "drop":
            on.discard(i)
        else:
            assert i in on, f"block {i} ran without its weights"
            runs.append(i)
        assert len(on - off.keep) <= 2
    assert set(runs) == set(range(len(blocks)))
    per_step = 2 * len(blocks)  # each block runs forward and is recomputed in backward
    assert len(runs) == 2 * per_step
    # from the second step on the order is known: each copy starts while the block before runs (a prefetch),
    # except at the turn from forward to backward and back
    second = off.log[[n for n, (a, _) in enumerate(off.log) if a == "run"][per_step]:]
    waited = sum(1 for a, _ in second if a == "load")
    ahead = sum(1 for a, _ in second if a == "prefetch")
    assert ahead >= len(blocks) and waited <= 2, (ahead, waited)
    for n, homes in enumerate(off.home):
        if n not in off.on_device_now():
            assert all(p.data.data_ptr() == cpu.data_ptr() for p, cpu in homes)


def test_a_run_with_every_memory_saving_on_trains_and_samples(demo_dir, tmp_path):
    cfg = tiny_config(demo_dir, name="small", **{"model.base": "tiny-demo", "model.weight_dtype": "fp8_e4m3fn",
                                                 "train.offload": "blocks", "train.offload_blocks": 2,
                                                 "train.checkpoint_depth": "layer", "train.steps": 6,
                                                 "sample.prompts": ["lablora, a circle"]})
    run = run_job(cfg, tmp_path)
    assert run.status()["state"] == "completed"
    log = (run.path / "log.txt").read_text()
    assert "wait in CPU memory and are copied to the device as they run" in log
    assert "(with gradient checkpointing, which offloading needs)" in log
    assert len(list(run.samples_dir.glob("*.png"))) == 1
    assert run.lora_path("small").exists()


def test_ema_resumes_exactly_and_is_exported(demo_dir, tmp_path):
    over = {"train.steps": 12, "save.every_n_steps": 4, "train.ema": True, "train.ema_decay": 0.9,
            "train.ema_every": 2, "train.learning_rate": 1e-2}
    full = run_job(tiny_config(demo_dir, name="full", **over), tmp_path)
    part = run_job(tiny_config(demo_dir, name="part", **over), tmp_path, *stopper(6))
    assert part.status()["step"] == 6
    run_job(tiny_config(demo_dir, name="part", **over), tmp_path, run=part)
    a, _ = read_lora(full.path / "full-ema.safetensors")
    b, meta = read_lora(part.path / "part-ema.safetensors")
    live, _ = read_lora(full.lora_path("full"))
    assert a.keys() == b.keys() == live.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(a[k], live[k]) for k in a if "lora_down" in k)  # an average, not the last weights
    assert full.status()["ema_lora"] == "full-ema.safetensors"
    assert "6 updates, decay 0.9" in (full.path / "log.txt").read_text()
    from ui.access import lora, my_loras
    from ui.context import AppContext

    ctx = AppContext.create(tmp_path, local=False)
    assert "runs/full/full-ema.safetensors" in [v for _, v in my_loras(ctx)]  # the Test tab lists it
    assert lora(ctx, "runs/full/full-ema.safetensors") == (full.path / "full-ema.safetensors").resolve()


def test_the_memory_estimate_covers_each_phase_and_each_saving():
    from trainer.memory_plan import phases

    cfg = resolve("sdxl-12gb", extra={"sample": {"prompts": ["a photo"]}})
    before = phases(cfg, "sdxl")
    assert set(before) == {"caching", "loading", "training", "sampling"}
    cfg.model.weight_dtype = "fp8_e4m3fn"
    fp8 = phases(cfg, "sdxl")
    assert 2.2 < before["loading"] - fp8["loading"] < 2.5  # half of SDXL's 4.8 GB UNet, less its small layers
    cfg.train.offload = "blocks"
    off = phases(cfg, "sdxl")
    assert off["training"] < fp8["training"] - 2 and off["sampling"] < fp8["sampling"] - 2
    cfg.train.offload_blocks = 40
    assert phases(cfg, "sdxl")["training"] > off["training"]  # blocks kept on the card cost memory again
    cfg.train.ema = True
    ema = phases(cfg, "sdxl")["training"]
    cfg.train.ema_on_cpu = True
    assert phases(cfg, "sdxl")["training"] < ema
    del cfg.sample.prompts[:]
    assert "sampling" not in phases(cfg, "sdxl")


def test_check_settings_says_what_does_not_fit_the_card_and_which_setting_would():
    from trainer.memory_plan import peak_gb
    from trainer.plan_summary import describe, plan

    xl = {"model": {"base": "stabilityai/stable-diffusion-xl-base-1.0"}, "sample": {"prompts": ["a photo"]}}
    cfg = resolve("sdxl-12gb", extra=xl)
    p = plan(cfg, None, on_cpu=False, card=6.0)
    assert p["warnings"][0].startswith(f"This run needs about {p['memory_gb']} GB (sampling), more than this 6.0 GB card")
    assert "It fits with model.weight_dtype=fp8_e4m3fn." in p["warnings"][0]
    text = describe(p, None)
    assert "GB by phase: caching" in text and "of this card's 6.0 GB" in text
    cfg.model.weight_dtype = "fp8_e4m3fn"  # what it said
    assert peak_gb(cfg, "sdxl") <= 6.0 * 0.95
    assert not any("more than this" in w for w in plan(cfg, None, on_cpu=False, card=6.0)["warnings"])
    big = resolve("sdxl-24gb", extra={**xl, "dataset": {"resolution": 2048}, "train": {"batch_size": 8}})
    assert "Even with every memory saving on it would not fit" in plan(big, None, on_cpu=False, card=2.0)["warnings"][0]
    assert not any("card" in w for w in plan(cfg, None, on_cpu=True)["warnings"])  # no card: nothing to check


@pytest.mark.parametrize("base", ["tiny-demo", "tiny-random-xl"])
def test_samples_encode_their_prompts_first_and_draw_what_the_pipeline_draws(base):
    """generate() brings the text encoders for the prompts and sends them back before the UNet works: the images
    are those of the pipeline called with the prompts, to the bit."""
    from trainer.sampling import make_pipeline

    model = load_base(base)
    ours = generate(model, ["lablora, a circle", "a square"], seed=3, steps=4, guidance_scale=5.0,
                    negative_prompt="blurry", width=64, height=64)
    pipe = make_pipeline(model)
    for prompt, image in zip(["lablora, a circle", "a square"], ours):
        g = torch.Generator("cpu").manual_seed(3)
        latents = torch.randn((1, 4, 64 // model.vae_scale, 64 // model.vae_scale), generator=g)
        with torch.no_grad():
            out = pipe(prompt=prompt, negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, width=64,
                       height=64, latents=latents, generator=g, output_type="latent")
            from trainer.sampling import decode

            theirs = decode(pipe, out.images)[0]
        assert np.array_equal(np.asarray(image), np.asarray(theirs))


def test_a_card_lending_shared_memory_is_named_in_the_warning():
    from trainer.memory_plan import spill_warning

    gb = 1024**3
    said = spill_warning(int(7.5 * gb), 6 * gb, windows=True)
    assert "7.5 GB" in said and "6.0 GB" in said and "shared system memory" in said
    assert spill_warning(5 * gb, 6 * gb, windows=True) is None


def test_the_meter_keeps_each_phases_own_peak(monkeypatch):
    """The phase bookkeeping, with CUDA's allocator counters played by a stand-in (there is no GPU here)."""
    from types import SimpleNamespace

    from trainer.memory_meter import PhaseMeter

    alloc = {"now": 0, "peak": 0, "reserved": 0}

    def use(n):
        alloc["now"] = n
        alloc["peak"] = max(alloc["peak"], n)
        alloc["reserved"] = max(alloc["reserved"], n + 10)

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: alloc.update(peak=alloc["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: alloc["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: alloc["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: alloc["reserved"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=1000))
    meter = PhaseMeter(SimpleNamespace(type="cuda"))
    meter.start("caching")
    use(300)
    use(20)
    meter.start("training")
    use(200)
    with meter.during("sampling"):
        use(500)
        use(150)
    use(250)
    meter.note()
    assert meter.peaks == {"caching": 300, "training": 250, "sampling": 500}
    assert meter.warning(0.1) is None
    use(1200)  # more than the card has: the Windows driver lends shared memory
    assert "more than the card has" in meter.warning(0.1)


def test_an_oft_file_from_an_fp8_base_is_the_rotation_of_the_stored_weights():
    """OFT files hold whole weight changes: from an fp8 base they are computed in fp32 from the stored weights
    (not merged into the fp8 weight, which would round them), as an fp32 model with those weights gives."""
    from trainer.export import adapter_file_tensors

    stored, rounded = adapted_unet("oft", "attention"), adapted_unet("oft", "attention")
    store_weights(stored.unet, torch.float8_e4m3fn, torch.float32)
    for a, b in zip(stored.unet.modules(), rounded.unet.modules()):
        if isinstance(a, StoredLinear):
            b.weight.data = b.weight.data.to(torch.float8_e4m3fn).float()
    ours = adapter_file_tensors(stored, stored.family, "oft", 4)
    theirs = adapter_file_tensors(rounded, rounded.family, "oft", 4)
    diffs = [k for k in ours if k.endswith(".diff")]
    assert diffs and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in diffs)
    assert max(ours[k].abs().max().item() for k in diffs) > 1e-4  # a change, not nothing
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in stored.unet.modules() if isinstance(m, StoredLinear))


def test_check_settings_warns_about_memory_options_that_will_not_work_together():
    cfg = resolve("sdxl-6gb", extra={"train": {"offload": "blocks", "compile": True, "checkpoint_depth": "layer"}})
    from trainer.plan_summary import plan

    warnings = " ".join(plan(cfg, None, on_cpu=True)["warnings"])
    assert "saves nothing on the CPU" in warnings
    assert "train.compile is not used with train.offload=blocks" in warnings
    assert "checkpoint_depth=layer keeps the norms' outputs" in warnings


def test_the_settings_that_fit_are_each_needed():
    import copy

    from trainer.memory_plan import SAVINGS, fitting_settings, peak_gb

    cfg = resolve("sdxl-24gb", extra={"sample": {"prompts": ["a photo"]}, "train": {"ema": True}})
    need = fitting_settings(cfg, "sdxl", 4.0)
    assert need and "train.offload=blocks" in need

    def peak_with(labels):
        trial = copy.deepcopy(cfg)
        for label, change in SAVINGS:
            if label in labels:
                change(trial)
        return peak_gb(trial, "sdxl")

    assert peak_with(need) <= 3.8
    for label in need:  # none of them can be left out
        assert peak_with([x for x in need if x != label]) > 3.8, (label, need)
