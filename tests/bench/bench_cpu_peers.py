"""Issue 20: LoRA Lab against the real peers on the CPU — diffusers' train_text_to_image_lora.py and
kohya sd-scripts' train_network.py, unchanged, on the same model, images, LoRA and optimizer.

    .venv/bin/python tests/bench/bench_cpu_peers.py [--diffusers ~/src/diffusers] [--sd-scripts ~/src/sd-scripts] \
        [--diffusers-python PY] [--sd-scripts-python PY] [--models tiny-demo,sd15] [--steps 60] [--tiny-steps 300]
        [--repeats 3]

Each tool runs in its own process through step_clock.py, which times every optimizer step from inside
(torch's global post-step hook), so start-up and caching are left out for all alike; steps/s is taken
over the steps after a warm-up. Runs are interleaved so machine noise hits every tool alike; the median
is reported. Repeat r trains with seed r in every tool, so the spread of a tool's final losses is
its seeds' spread. The final loss is measured the same way for every tool's LoRA file: merged into the base
model with LoRA Lab's reader (which reads each tool's format), the mean loss over every training image
at 8 fixed timesteps with fixed noise; the base model's loss shows how much each run learned.

What each tool is given (their defaults otherwise): 64 px crops of the demo dataset (8 images), batch 1,
rank 4 and alpha 4, AdamW at lr 1e-3 and weight decay 0.01, constant schedule, gradient clipping 1.0,
fp32, no sampling, no validation, one save at the end. diffusers' script trains LoRA on the UNet's
attention (`network.targets: attention` in LoRA Lab) and encodes images and captions every step, as it
does; sd-scripts trains its default layers (`attention_ff`) with `--cache_latents` and `--sdpa`, as a
sd-scripts user would, against LoRA Lab's `attention_ff` twice: as it starts a LoRA by default
(`network.init_weights: gaussian`, as diffusers' script does) and as sd-scripts starts one (`kaiming`).
Models: `tiny-demo` (LoRA Lab's demo model; sd-scripts is skipped there, as it builds SD 1.5's fixed
architecture) and `sd15` (a full-size SD 1.5 with random weights, random_model.py,
its VAE settled as a trained one's: settled_vae; sd-scripts gets its text encoder in transformers 4's
layout: for_transformers4).

The peers are not LoRA Lab's dependencies and CI does not run this. Their Pythons need the packages
each pins (sd-scripts: transformers 4.54, diffusers 0.32, accelerate 1.6); torch may come from ours.
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, report

import torch

HERE = Path(__file__).resolve().parent
WARMUP = 10
LR, RANK, RES = 1e-3, 4, 64


def make_data(root: Path) -> dict:
    """The demo images in the three layouts: LoRA Lab's flat folder, an imagefolder with metadata.jsonl
    (diffusers' script), and sd-scripts' `N_name` repeat folder."""
    from trainer.data.demo import make_demo_dataset

    flat = make_demo_dataset(root / "flat", count=8, size=RES)
    rows = [{"file_name": p.name, "text": p.with_suffix(".txt").read_text().strip()} for p in sorted(flat.glob("*.png"))]
    (flat / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kohya = root / "kohya" / "1_lablora"
    shutil.copytree(flat, kohya, ignore=shutil.ignore_patterns("metadata.jsonl"))
    return {"flat": flat, "kohya": kohya.parent}


def engine(py, model, data, out: Path, steps: int, seed: int, targets: str, init: str = "gaussian"
           ) -> tuple[list, Path]:
    cfg = {"name": "peer", "model": {"base": str(model)},
           "dataset": {"source": str(data["flat"]), "resolution": RES, "bucketing": False, "resize": "crop"},
           "network": {"rank": RANK, "alpha": RANK, "targets": targets, "init_weights": init},
           "train": {"steps": steps, "learning_rate": LR, "lr_scheduler": "constant", "mixed_precision": "fp32",
                     "device": "cpu", "seed": seed},
           "validation": {"enabled": False}, "save": {"every_n_steps": 0}, "sample": {"every_n_steps": 0}}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))  # YAML is a superset of JSON
    cmd = ["-m", "trainer", "train", "--config", str(out / "config.json"), "--workspace", str(out / "ws")]
    return clocked(py, cmd, ROOT, out), out / "ws" / "runs" / "peer" / "peer.safetensors"


def diffusers_script(py, repo: Path, model, data, out: Path, steps: int, seed: int) -> tuple[list, Path]:
    script = repo / "examples" / "text_to_image" / "train_text_to_image_lora.py"
    cmd = [str(script), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data["flat"]),
           "--caption_column", "text", "--resolution", str(RES), "--center_crop", "--train_batch_size", "1",
           "--max_train_steps", str(steps), "--learning_rate", str(LR), "--lr_scheduler", "constant",
           "--lr_warmup_steps", "0", "--rank", str(RANK), "--adam_weight_decay", "0.01", "--max_grad_norm", "1.0",
           "--output_dir", str(out / "out"), "--seed", str(seed), "--dataloader_num_workers", "0",
           "--mixed_precision", "no", "--checkpointing_steps", "1000000"]
    out.mkdir(parents=True)
    return clocked(py, cmd, out, out), out / "out" / "pytorch_lora_weights.safetensors"


def sd_scripts(py, repo: Path, model, data, out: Path, steps: int, seed: int) -> tuple[list, Path]:
    tokenizers = out / "tokenizers"  # sd-scripts takes SD 1.5's tokenizer from the hub unless cached here
    shutil.copytree(Path(model) / "tokenizer", tokenizers / "openai_clip-vit-large-patch14")
    cmd = [str(repo / "train_network.py"), "--pretrained_model_name_or_path", str(model),
           "--tokenizer_cache_dir", str(tokenizers), "--train_data_dir", str(data["kohya"]),
           "--resolution", f"{RES},{RES}", "--output_dir", str(out / "out"), "--output_name", "peer",
           "--save_model_as", "safetensors", "--network_module", "networks.lora", "--network_dim", str(RANK),
           "--network_alpha", str(RANK), "--network_train_unet_only", "--learning_rate", str(LR),
           "--optimizer_type", "AdamW", "--optimizer_args", "weight_decay=0.01", "--max_grad_norm", "1.0",
           "--lr_scheduler", "constant", "--train_batch_size", "1", "--max_train_steps", str(steps),
           "--mixed_precision", "no", "--save_precision", "float", "--cache_latents", "--seed", str(seed),
           "--caption_extension", ".txt", "--max_data_loader_n_workers", "0", "--sdpa"]
    return clocked(py, cmd, repo, out), out / "out" / "peer.safetensors"


def link_the_rest(model: Path, out: Path) -> Path:
    """Link each part of `model` that `out` has not got (its model_index.json last: a folder with it is whole)."""
    for part in sorted(model.iterdir(), key=lambda p: p.name == "model_index.json"):
        if not (out / part.name).exists():
            (out / part.name).symlink_to(part.resolve())
    return out


def settled_vae(model: Path, out: Path) -> Path:
    """The random model with a VAE that encodes like a trained one. A random VAE's posterior std is about
    1 against a spread of about 0.2 in its means, so its latents are mostly the random draw, and tools
    that draw differently (sd-scripts caches one draw per image, diffusers' script draws every step) would
    learn different targets, and none the means the loss is measured on. A trained VAE's std is small:
    here the log-variance half of `quant_conv` is set to -20 (std 5e-5). The rest is linked, not copied."""
    from diffusers import AutoencoderKL

    if (out / "model_index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(model / "vae")
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:] = 0
        vae.quant_conv.bias[half:] = -20
    vae.save_pretrained(out / "vae")
    return link_the_rest(model, out)


def for_transformers4(model: Path, out: Path) -> Path:
    """The model folder as sd-scripts' pinned transformers 4 reads it. transformers 5 saves CLIPTextModel
    without the `text_model.` prefix of its keys; transformers 4 does not find them and starts that text
    encoder from new random weights (with only a warning), so sd-scripts would train against another
    model's text conditioning. Here the keys get their prefix back; the rest is linked."""
    from safetensors.torch import load_file, save_file

    if (out / "model_index.json").exists():
        return out
    (out / "text_encoder").mkdir(parents=True, exist_ok=True)
    src = model / "text_encoder"
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / "text_encoder" / f.name)
        else:
            tensors = load_file(f)
            save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()},
                      out / "text_encoder" / f.name, metadata={"format": "pt"})
    return link_the_rest(model, out)


def clocked(py, cmd: list, cwd: Path, out: Path) -> list:
    times = out / "times.json"
    with open(out / "log.txt", "w") as log:
        done = subprocess.run([str(py), str(HERE / "step_clock.py"), str(times), *cmd], cwd=cwd, stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({done.returncode}); its output: {out / 'log.txt'}")
    return json.loads(times.read_text())


def steps_per_second(times: list) -> float:
    t = times[WARMUP:]
    return (len(t) - 1) / (t[-1] - t[0])


def fixed_losses(model_path, data, files: dict, timesteps: int = 8) -> dict:
    """Mean loss over every training image × `timesteps` fixed timesteps with fixed noise, for the base
    model and for each tool's LoRA files (one a repeat) merged at strength 1 (eps prediction: the demo and
    SD 1.5 models)."""
    from trainer.data.images import fit, open_image, to_tensor
    from trainer.encode import encode_images, encode_text
    from trainer.lora_file import AppliedLoras
    from trainer.models.load import load_base

    m = load_base(str(model_path))
    sched = m.noise_scheduler()
    t = torch.linspace(0, sched.config.num_train_timesteps - 1, timesteps + 2)[1:-1].round().long()
    inputs = []
    for n, png in enumerate(sorted(data["flat"].glob("*.png"))):
        mean, _ = encode_images(m.vae, to_tensor(fit(open_image(png), (RES, RES), "crop")[0])[None])
        latent = (mean * m.vae.config.scaling_factor).expand(timesteps, -1, -1, -1)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(n))
        emb, _ = encode_text(m, [png.with_suffix(".txt").read_text().strip()], "cpu")
        inputs.append((sched.add_noise(latent, noise, t), noise, emb.expand(timesteps, -1, -1)))

    def loss() -> float:
        with torch.no_grad():
            return statistics.fmean(torch.nn.functional.mse_loss(m.unet(x, t, e).sample, eps).item()
                                    for x, eps, e in inputs)

    out = {"base model": [loss()]}
    for name, paths in files.items():
        out[name] = []
        for path in paths:
            applied = AppliedLoras(m, [(path, 1.0)])
            out[name].append(loss())
            applied.remove()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--diffusers", type=Path, help="a checkout of huggingface/diffusers")
    ap.add_argument("--sd-scripts", type=Path, help="a checkout of kohya-ss/sd-scripts")
    ap.add_argument("--diffusers-python", default=sys.executable)
    ap.add_argument("--sd-scripts-python", default=sys.executable)
    ap.add_argument("--models", default="tiny-demo,sd15")
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/lora-lab-models"))
    ap.add_argument("--steps", type=int, default=60, help="steps of each run on a full-size model")
    ap.add_argument("--tiny-steps", type=int, default=300, help="on tiny-demo (about 15 steps/s: a few seconds "
                    "of steps would measure this VM's bursts of noise more than the tools)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if not (a.diffusers or a.sd_scripts):
        ap.error("name a peer to run against: --diffusers, --sd-scripts or both")
    from random_model import make_random_model

    tmp = Path(tempfile.mkdtemp(prefix="peers-"))
    data = make_data(tmp / "data")
    rows, runs = [], {}
    for name in a.models.split(","):
        steps = a.tiny_steps if name == "tiny-demo" else a.steps
        model = ROOT / "trainer" / "models" / "tiny-demo" if name == "tiny-demo" else settled_vae(
            make_random_model(name, a.models_dir / name), a.models_dir / f"{name}-settled-vae")
        tools = {}
        if a.diffusers:
            tools["LoRA Lab (attention)"] = lambda out, seed: engine(sys.executable, model, data, out, steps, seed,
                                                                     "attention")
            tools["diffusers train_text_to_image_lora.py"] = lambda out, seed: diffusers_script(
                a.diffusers_python, a.diffusers, model, data, out, steps, seed)
        if a.sd_scripts and name != "tiny-demo":
            tools["LoRA Lab (attention_ff)"] = lambda out, seed: engine(sys.executable, model, data, out, steps,
                                                                        seed, "attention_ff")
            tools["LoRA Lab (attention_ff, init kaiming)"] = lambda out, seed: engine(
                sys.executable, model, data, out, steps, seed, "attention_ff", "kaiming")
            old_layout = for_transformers4(model, a.models_dir / f"{name}-transformers4")
            tools["sd-scripts train_network.py"] = lambda out, seed: sd_scripts(
                a.sd_scripts_python, a.sd_scripts, old_layout, data, out, steps, seed)
        speeds, files = {k: [] for k in tools}, {k: [] for k in tools}
        for r in range(a.repeats):
            for i, (tool, run) in enumerate(tools.items()):
                times, file = run(tmp / f"{name}-{r}-{i}", r)  # repeat r: seed r for every tool
                files[tool].append(file)
                speeds[tool].append(steps_per_second(times))
                print(f"{name} {tool}: {speeds[tool][-1]:.2f} steps/s", flush=True)
        losses = fixed_losses(model, data, files)
        runs[name] = {"steps": steps, "steps_per_s": speeds, "fixed_loss": losses}
        for tool, v in speeds.items():
            loss = losses[tool]
            rows.append({"model": name, "tool": tool, "steps/s (median)": f"{statistics.median(v):.2f}",
                         "range": f"{min(v):.2f}–{max(v):.2f}",
                         "final loss (fixed noise), median": f"{statistics.median(loss):.4f}",
                         "range ": f"{min(loss):.4f}–{max(loss):.4f}", "base model's": f"{losses['base model'][0]:.4f}"})
    only = "" if a.diffusers and a.sd_scripts else "_diffusers" if a.diffusers else "_sd-scripts"
    report("cpu_peers_" + a.models.replace(",", "_") + only, rows, {"repeats": a.repeats, "warmup_steps": WARMUP,
                               "setup": f"{RES} px demo images (8), batch 1, rank {RANK}, AdamW lr {LR}, fp32",
                               "diffusers": git_head(a.diffusers), "sd_scripts": git_head(a.sd_scripts), "runs": runs})


def git_head(repo) -> str:
    if not repo:
        return ""
    done = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%h %cs"], capture_output=True, text=True)
    return done.stdout.strip()


if __name__ == "__main__":
    main()
