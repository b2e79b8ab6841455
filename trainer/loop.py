"""The training loop: one function from a config to a finished run folder.

Read `train()` top to bottom: set up, then for each optimizer step draw a batch from one bucket,
add noise, predict it, step; report, save and sample on schedule; honour stop within one step.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import traceback
from pathlib import Path

import torch

from . import run_lock
from .adapters import adapter_state_dict, load_adapter_state
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config
from .data.plan import epoch_batches, step_caption
from .encode import encode_text, sdxl_time_ids, vae_shift_scale
from .errors import LoraLabError
from .events import Callback, Control, Event
from .export import adapter_file_tensors, dataset_folders, metadata, save_file_atomic
from .compile_plan import COMPILING, compiled, decide
from .memory_meter import PhaseMeter
from .optim import compute_loss, min_snr_weights
from .precision import ACCELERATE, DTYPE, mixed_precision
from .prepare import Prepared, pick_device, prepare
from .runs import DISK_FULL, DISK_FULL_ADVICE, RunDir, disk_full, new_run, removed_on_failure
from .sampling import SamplingStopped, generate
from .validation import TRAINING, Measurement, best_of, every


class NonFiniteLoss(Exception):
    pass


def process_share(global_batch: list[int], per_process: int, rank: int, processes: int) -> list[tuple[int, int]]:
    """(position, example) pairs of one process's slice of a global batch.

    With several processes a short last batch of a bucket is filled up by repeating its examples,
    so every process has work in every step (data-parallel processes must step together).
    """
    if processes == 1:
        return list(enumerate(global_batch))
    padded = [global_batch[i % len(global_batch)] for i in range(per_process * processes)]
    start = per_process * rank
    return [(pos, padded[pos]) for pos in range(start, start + per_process)]


def to_device(x: torch.Tensor, device: torch.device, dtype=None) -> torch.Tensor:
    """Host to accelerator. On CUDA from pinned memory without waiting: the copy queues behind the work already
    launched instead of stalling the host (PyTorch's pinned-memory cache keeps the buffer until it is done)."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, dtype, non_blocking=True)
    return x.to(device, dtype)


def clip_gradients(acc, params, max_norm: float) -> None:
    """accelerate's clip_grad_norm_ (which unscales fp16 gradients first), with PyTorch's for-each kernels on the
    CPU too: its default uses them on CUDA only, and on the CPU clips tensor by tensor in Python. Elsewhere (mps)
    PyTorch decides: foreach=True raises there."""
    acc.unscale_gradients()
    foreach = True if params and params[0].device.type in ("cuda", "cpu") else None
    torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)


def _accelerator(precision: str, device: torch.device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one global state per process; a second run in the app may want another precision.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=ACCELERATE[precision], cpu=device.type == "cpu")


class Job:
    """One run: its folder, its events, its commands."""

    def __init__(self, cfg: Config, run: RunDir, callback: Callback | None, control: Control | None):
        self.cfg, self.run = cfg, run
        self.callback = callback or (lambda e: None)
        self.control = control or Control()
        self.main = True
        self.cuda = None  # the CUDA device being trained on, whose memory the progress reports
        self.best, self.since_best = None, 0  # lowest validation loss (validation.Measurement), measurements since
        self.validation_seconds = 0.0
        self.scoring = None  # (Scorer, Reference) once loaded; False when scores are off for this run
        self.ema = None  # ema.AdapterEMA with train.ema
        self.compute_dtype = torch.float32  # of the training's maths: mixed precision's half type, or fp32
        self.meter = PhaseMeter(torch.device("cpu"))  # memory_meter: the run's device once it starts
        self.memory_warning = self.fit_warning = None
        self.flushed = None  # (time, step) of the last flush: the seconds per step since then

    def emit(self, kind: str, **data) -> None:
        if self.main:
            self.callback(Event(kind, data))

    def log(self, line: str) -> None:
        if self.main:
            self.run.log(line)
            self.emit("log", line=line)

    # --- one micro-batch -----------------------------------------------------------------
    def example_inputs(self, p: Prepared, n: int, seed: int, noise_sched):
        """One example's noisy latent, target, timestep, caption and size conditioning.

        Every random draw comes from a generator seeded by (run seed, micro-step, position in the
        global batch), so a run repeats exactly, resumes exactly, and N processes with batch B draw
        what one process with batch N·B draws.
        """
        cfg, model = self.cfg, p.model
        g = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        flip = cfg.dataset.flip and rng.random() < 0.5
        e = p.latents.data[(n, flip)]
        shift, scale = vae_shift_scale(model.vae)
        latent = ((e["mean"] + e["std"] * torch.randn(e["mean"].shape, generator=g)) - shift) * scale
        noise = torch.randn(latent.shape, generator=g)
        if cfg.train.noise_offset:
            noise = noise + cfg.train.noise_offset * torch.randn((noise.shape[0], 1, 1), generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (1,), generator=g)
        caption = step_caption(p.examples[n].caption, cfg.dataset, rng)
        w, h = p.examples[n].size
        time_ids = sdxl_time_ids(tuple(e["original"].tolist()), tuple(e["crop"].tolist()), (h, w))
        return latent, noise, t, caption, time_ids

    def micro_step(self, p: Prepared, acc, unet, noise_sched, batch, m: int, device) -> torch.Tensor:
        """The loss of this process's share of global micro-batch `m` (`batch`: (position, example))."""
        cfg, model = self.cfg, p.model
        parts = [self.example_inputs(p, n, (cfg.train.seed * 1_000_003 + m) * 4096 + pos, noise_sched)
                 for pos, n in batch]
        latents = torch.stack([x[0] for x in parts])
        noise = torch.stack([x[1] for x in parts])
        t = torch.cat([x[2] for x in parts])
        # noised on the CPU, where the draws are: a handful of GPU launches fewer; then one copy for both
        noisy = noise_sched.add_noise(latents, noise, t)
        target = noise_sched.get_velocity(latents, noise, t) if model.prediction_type == "v_prediction" else noise
        noisy, target = to_device(torch.stack([noisy, target]), device).unbind(0)
        t = to_device(t, device)
        captions = [x[3] for x in parts]
        if p.text is not None:
            embeds, pooled = p.text.batch(captions)
        else:
            embeds, pooled = encode_text(model, captions, device)
        extra = None
        if model.is_xl:
            extra = {"text_embeds": to_device(pooled, device),
                     "time_ids": to_device(torch.stack([x[4] for x in parts]), device)}
        # in the compute dtype once: autocast would cast them again for every cross-attention's k and v
        embeds = to_device(embeds, device, self.compute_dtype)
        with acc.autocast():
            pred = unet(noisy, t, embeds, added_cond_kwargs=extra).sample
        loss = compute_loss(pred, target, cfg.train.loss, cfg.train.huber_delta)
        if cfg.train.min_snr_gamma:
            loss = loss * min_snr_weights(noise_sched.alphas_cumprod, t, cfg.train.min_snr_gamma,
                                          model.prediction_type)
        return loss.mean()

    # --- saving -------------------------------------------------------------------------
    def adapter_state(self, p: Prepared) -> dict:
        out = {f"unet.{k}": v for k, v in adapter_state_dict(p.model.unet).items()}
        if self.cfg.network.train_text_encoder:
            for i, te in enumerate(p.model.text_encoders):
                out.update({f"te{i}.{k}": v for k, v in adapter_state_dict(te).items()})
        return out

    def save(self, p: Prepared, step: int, acc) -> None:
        if not self.main:
            return
        state = {"optimizer": p.optimizer.state_dict(), "scheduler": p.scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        if acc.scaler is not None:
            state["scaler"] = acc.scaler.state_dict()
        if self.ema:
            state["ema"] = self.ema.state_dict()
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        m = (step - p.start_step) * self.cfg.train.gradient_accumulation
        info = {"seed": self.cfg.train.seed, "epoch": m // p.batches_per_epoch, "batch": m % p.batches_per_epoch,
                "offset": p.start_step}
        path = save_checkpoint(self.run.checkpoints_dir, step, self.adapter_state(p), state, info,
                               self.cfg.save.keep_last)
        self.emit("checkpoint", step=step, path=str(path))

    def restore(self, p: Prepared, acc) -> int:
        ck = latest_checkpoint(self.run.checkpoints_dir)
        if ck is None:
            return p.start_step
        adapter, state, info = load_checkpoint(ck)
        load_adapter_state(p.model.unet, {k[5:]: v for k, v in adapter.items() if k.startswith("unet.")})
        for i, te in enumerate(p.model.text_encoders if self.cfg.network.train_text_encoder else []):
            load_adapter_state(te, {k[len(f"te{i}."):]: v for k, v in adapter.items() if k.startswith(f"te{i}.")})
        p.optimizer.load_state_dict(state["optimizer"])
        p.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "scaler" in state and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        if self.ema and "ema" in state:  # a run that turns train.ema on when resumed starts its average here
            self.ema.load_state_dict(state["ema"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        p.start_step = info.get("offset", 0)
        self.log(f"resumed from {ck.name}")
        return info["step"]

    def sample(self, p: Prepared, step: int, unet, device) -> None:
        s = self.cfg.sample
        if not s.prompts or not self.main:
            return
        unet.eval()
        res = self.cfg.dataset.resolution

        def progress(i, n):  # what the live panel shows meanwhile: sampling holds up the steps and the ETA
            self.run.set_status("running", phase=f"making samples: image {i + 1} of {n} ({s.steps} steps each)")

        try:
            with self.meter.during("sampling"):
                images = generate(p.model, s.prompts, s.seed, s.steps, s.guidance_scale, s.width or res,
                                  s.height or res, s.negative_prompt, s.scheduler, unet=unet, device=device,
                                  progress=progress, should_stop=self.control.stop.is_set)
        except SamplingStopped:
            self.log(f"samples at step {step} left unfinished: stopping")
            return
        finally:
            unet.train()
            self.run.set_status("running", phase=None, memory_by_phase=self.meter.peaks or None,
                                reserved_by_phase=self.meter.reserved or None)
        for i, img in enumerate(images):
            path = self.run.samples_dir / f"step{step:06d}_{i:02d}.png"
            tmp = path.with_name("." + path.name)
            with removed_on_failure(self.run.path, tmp):
                img.save(tmp, format="PNG")
                tmp.replace(path)
            self.emit("sample", step=step, path=str(path), prompt=s.prompts[i])
        self.score_samples(p, step, images)

    def score_samples(self, p: Prepared, step: int, images) -> None:
        """CLIP scores of one round of samples, to samples/scores.jsonl and the log; a CLIP model that does
        not load turns scores off for the run (with the reason in the log), never the run itself."""
        s = self.cfg.sample
        if not s.score_model or self.scoring is False:
            return
        from .scores import COPY_SIMILARITY, load_scorer, mean, training_reference

        try:
            if self.scoring is None:
                scorer = load_scorer(s.score_model)
                self.scoring = scorer, training_reference(scorer, p.dataset, p.examples)
            scores = self.scoring[0].score(images, s.prompts[:len(images)], self.scoring[1])
        except LoraLabError as e:
            self.scoring = False
            self.log(f"sample scores off for this run: {e.problem} {e.fix}")
            return
        except Exception as e:  # scores are an extra: whatever goes wrong there, the run goes on
            self.scoring = False
            self.log(f"sample scores off for this run: {type(e).__name__}: {e}")
            return
        with open(self.run.samples_dir / "scores.jsonl", "a", encoding="utf-8") as f:
            for i, sc in enumerate(scores):
                f.write(json.dumps({"step": step, "index": i, "prompt": s.prompts[i], **sc.row()}) + "\n")
        self.log(f"sample scores at step {step}: likeness {mean(x.likeness for x in scores):.3f}, "
                 f"prompt {mean(x.prompt for x in scores):.3f}")
        for i, sc in enumerate(scores):
            if sc.copy:
                self.log(f"warning: sample {i + 1} at step {step} is a near-copy of the training image {sc.nearest} "
                         f"(similarity {sc.similarity:.3f} ≥ {COPY_SIMILARITY}): the LoRA may be memorising its images")

    def export(self, p: Prepared, step: int, path: Path | None = None) -> Path:
        cfg = self.cfg
        tensors = adapter_file_tensors(p.model, p.model.family, cfg.network.algorithm, cfg.network.alpha)
        res = (cfg.dataset.resolution, cfg.dataset.resolution)
        captions = [e.caption for e in p.examples]
        folders = dataset_folders(cfg.dataset.source, [p.dataset.items[e.index].name for e in p.examples], captions,
                                  [e.repeats for e in p.examples])
        meta = metadata(cfg, p.model.family, step, captions, len(p.examples), res, folders,
                        self.run.status().get("started"), p.model.prediction_type)
        path = path or self.run.lora_path(cfg.name)
        with removed_on_failure(self.run.path, path.with_name(f".{path.name}.tmp")):  # save_file_atomic's temporary
            return save_file_atomic(tensors, path, meta, cfg.save.precision)

    # --- validation ---------------------------------------------------------------------
    @property
    def best_path(self) -> Path:
        return self.run.path / f"{self.run.lora_path(self.cfg.name).stem}-best.safetensors"

    @property
    def ema_path(self) -> Path:
        return self.run.path / f"{self.run.lora_path(self.cfg.name).stem}-ema.safetensors"

    def start_validation(self, p: Prepared, step: int, unet, device, acc) -> int:
        """Steps between measurements (0: none); picks up the best so far of a resumed run, and measures
        the starting weights of a new one, so the curve shows where it began."""
        v = self.cfg.validation
        if p.validator is None:
            return 0
        interval = every(v, self.cfg.save.every_n_steps, self.cfg.train.steps)
        rows = self.run.validation()
        self.best, self.since_best = best_of(rows)
        if self.best and self.best_path.exists() and self.main:
            from .lora_file import read_lora

            if read_lora(self.best_path)[1].get("ss_steps") != str(self.best.step):
                self.best_path.unlink()  # written past the checkpoint this run resumed from
        on = " (too few images to hold any out: compare its trend, not its level)" if p.validator.label == TRAINING else ""
        self.log(f"validation loss: {p.validator.description}, every {interval} steps{on}")
        if not rows:  # a resumed run's curve already starts where it began
            self.validate(p, step, unet, device, acc)
        return interval

    def validate(self, p: Prepared, step: int, unet, device, acc) -> bool:
        """Measure, record, keep the best LoRA; True when validation.patience says to stop."""
        v = self.cfg.validation
        began = time.time()
        loss = p.validator.measure(acc.unwrap_model(unet, keep_torch_compile=False), device, acc.autocast,
                                   p.model.text_encoders if self.cfg.network.train_text_encoder else [])
        self.validation_seconds += time.time() - began
        new_best = self.best is None or loss < self.best.loss
        if new_best:
            self.best, self.since_best = Measurement(step, loss), 0
        else:
            self.since_best += 1
        if self.main:
            self.run.append_metrics({"step": step, "val_loss": loss, "val_on": p.validator.label, "time": time.time()})
            if new_best and v.keep_best and step > p.start_step:
                self.export(p, step, self.best_path)
            self.run.set_status("running", val_loss=loss, best_step=self.best.step, best_val_loss=self.best.loss)
        self.emit("validation", step=step, loss=loss, best_step=self.best.step, best_loss=self.best.loss)
        self.log(f"validation loss at step {step}: {loss:.5f}" + (" (lowest so far)" if new_best else
                 f" (lowest {self.best.loss:.5f} at step {self.best.step})"))
        stop = [bool(v.patience and self.since_best >= v.patience)]
        if acc.num_processes > 1:  # the main process decides: every process must leave the loop at the same step
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(stop)
        return stop[0]

    def finish_validation(self, step: int) -> dict:
        """Status keys of the best step; the best file goes when the last step is the best."""
        if self.best is None:
            return {}
        self.log(f"validation took {self.validation_seconds:.1f} s of this session")
        if self.best.step == step and self.best_path.exists():
            self.best_path.unlink()
        return {"best_step": self.best.step, "best_val_loss": self.best.loss, "validation_seconds": self.validation_seconds,
                "best_lora": self.best_path.name if self.best_path.exists() else None}

    # --- the loop -----------------------------------------------------------------------
    def train(self, resume: bool) -> RunDir:
        cfg = self.cfg
        device = pick_device(cfg.train.device)
        precision = mixed_precision(cfg.train.mixed_precision, device)
        acc = _accelerator(precision, device)
        self.main = acc.is_main_process
        device = acc.device
        if cfg.train.offload == "blocks" and acc.num_processes > 1:
            raise LoraLabError("train.offload=blocks trains on one GPU, not under accelerate launch with several.",
                               "Use train.offload=text_encoders with several GPUs, or launch one process.")
        if device.type not in ("cuda", "cpu") and (cfg.train.offload == "blocks" or "fp8" in cfg.model.weight_dtype):
            raise LoraLabError(f"train.offload=blocks and fp8 base weights need a CUDA GPU (or the CPU), not {device.type}.",
                               "Use train.offload=text_encoders and model.weight_dtype=auto, bf16 or fp16 on this device.")
        torch.manual_seed(cfg.train.seed)
        weight_dtype = self.compute_dtype = DTYPE[precision]  # frozen weights in the training precision, as kohya does
        self.emit("status", state="loading", message="Loading the model and dataset…")
        if self.main:  # this process's pid: a restarted app tells a live run from an interrupted one
            self.run.set_status("running", pid=os.getpid(), phase="Loading the model and dataset…", speed=None,
                                eta=None)  # a resumed run's speed and ETA were the last session's
        self.meter = PhaseMeter(device)
        p = prepare(cfg, self.run.path.parent.parent, device, weight_dtype, self.log, acc.num_processes, self.meter)
        noise_sched = p.model.noise_scheduler()
        unet = p.model.unet
        unet.train()
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and newer
            torch.backends.cudnn.allow_tf32 = True
        if cfg.train.channels_last and p.offloader:
            self.log("train.channels_last: not used with train.offload=blocks (the blocks come from CPU memory as they are)")
        elif cfg.train.channels_last:
            unet.to(memory_format=torch.channels_last)
        compiling, said = decide(cfg, device, p.offloader is not None)
        if said:
            self.log(said)
        if compiling:
            unet = compiled(unet, self.run.path.parent.parent, len({e.size for e in p.examples}))
        # with offload=blocks the offloader has placed the UNet (its blocks' weights wait in CPU memory)
        unet, optimizer = acc.prepare(unet, p.optimizer, device_placement=[p.offloader is None, True])
        if cfg.train.ema:
            from .ema import AdapterEMA

            t = cfg.train
            self.ema = AdapterEMA(p.params, t.ema_decay, t.ema_every, t.ema_on_cpu)
        step = begun = self.restore(p, acc) if resume else p.start_step
        self.cuda = device if device.type == "cuda" else None
        if self.cuda:
            self.check_fit(p)
        self.meter.start("training")  # the peak shown is the training's: caching (VAE, text encoders) is over by now
        if resume and self.main:
            self.run.truncate_metrics(step)
        total = p.start_step + cfg.train.steps
        accum = cfg.train.gradient_accumulation
        if self.main:
            self.run.set_status("running", step=step, total_steps=total, pid=os.getpid(), phase=None,
                                speed=None, eta=None, started=self.run.status().get("started", time.time()))
        self.emit("status", state="running", step=step, total=total)
        if step >= total:
            self.log("nothing left to train")
        val_every = self.start_validation(p, step, unet, device, acc)
        if compiling and self.main:  # the live panel says why the first step takes minutes
            self.run.set_status("running", phase=COMPILING)
        pending: list[tuple[int, torch.Tensor, float]] = []
        flush_every = 1 if device.type == "cpu" else 10  # reading a GPU loss waits for the GPU
        t0, done0, epochs = time.time(), step, {}
        last_loss = math.nan
        stopped_early = False
        while step < total and not stopped_early:
            if self.control.stop.is_set():
                break
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for k in range(accum):
                m = (step - p.start_step) * accum + k
                epoch, idx = divmod(m, p.batches_per_epoch)
                if epoch not in epochs:
                    epochs = {epoch: epoch_batches(p.examples, cfg.train.batch_size * acc.num_processes,
                                                   cfg.train.seed, epoch)}
                share = process_share(epochs[epoch][idx], cfg.train.batch_size, acc.process_index, acc.num_processes)
                loss = self.micro_step(p, acc, unet, noise_sched, share, m, device)
                acc.backward(loss / accum)
                step_loss += loss.detach() / accum
            if cfg.train.max_grad_norm:
                clip_gradients(acc, p.params, cfg.train.max_grad_norm)
            optimizer.step()
            p.scheduler.step()
            step += 1
            if self.ema:
                self.ema.update(step)
            if compiling and step == begun + 1 and self.main:
                self.run.set_status("running", phase=None)
            pending.append((step, step_loss, p.scheduler.get_last_lr()[0]))
            save_due = cfg.save.every_n_steps and step % cfg.save.every_n_steps == 0
            sample_due = cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0
            save_now = Control.take(self.control.save_now)
            sample_now = Control.take(self.control.sample_now)
            val_due = val_every and (step % val_every == 0 or step == total)
            if len(pending) >= flush_every or save_due or save_now or step == total or val_due:
                last_loss = self.flush(pending, acc, step, total, t0, done0)
                pending = []
            if val_due:
                stopped_early = self.validate(p, step, unet, device, acc)
            if save_due or save_now:
                self.save(p, step, acc)
                if save_now:
                    self.log(f"Save now: checkpoint saved at step {step}")
            if sample_due or sample_now:
                if sample_now:
                    self.log(f"Sample now: making samples at step {step}")
                self.sample(p, step, acc.unwrap_model(unet, keep_torch_compile=False), device)
            if val_due or save_due or save_now or sample_due or sample_now:
                self.flushed = None  # the time they took is not a training step's
        if pending:
            last_loss = self.flush(pending, acc, step, total, t0, done0)
        if step < total and not stopped_early:  # stopped
            if step > begun:  # else its checkpoint is the one it resumed from
                self.save(p, step, acc)
            if self.main:
                self.run.set_status("stopped", step=step, total_steps=total, last_loss=last_loss)
            self.emit("status", state="stopped", step=step)
            self.log(f"stopped at step {step}; resume continues from here")
            return self.run
        if step > begun:
            self.save(p, step, acc)
        if self.main:
            if cfg.sample.prompts and not (cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0):
                self.sample(p, step, acc.unwrap_model(unet, keep_torch_compile=False), device)
        self.meter.note()
        if self.meter.peaks:  # after the last samples, whose peak is often the run's
            self.log("peak GPU memory by phase (allocated / reserved): " + ", ".join(
                f"{k} {v / 1024**3:.2f} / {self.meter.reserved.get(k, 0) / 1024**3:.2f} GB" for k, v in self.meter.peaks.items()))
        if self.main:
            path = self.export(p, step)
            early = {}
            if stopped_early:
                early = {"stopped_early": step}
                self.log(f"stopped early at step {step}: no lower validation loss in {cfg.validation.patience} "
                         f"measurements (lowest {self.best.loss:.5f} at step {self.best.step})")
            best = self.finish_validation(step)
            if self.ema:
                with self.ema.applied():
                    best["ema_lora"] = self.export(p, step, self.ema_path).name
            self.run.set_status("completed", step=step, total_steps=total, last_loss=last_loss, lora=path.name,
                                finished=time.time(), **early, **best)
            self.log(f"saved {path.name}")
            if self.ema:
                self.log(f"saved {self.ema_path.name} (the average of the adapter weights over "
                         f"{self.ema.updates} updates, decay {cfg.train.ema_decay})")
            if best.get("best_lora"):
                self.log(f"saved {best['best_lora']} (step {best['best_step']}, the lowest validation loss)")
            self.emit("status", state="completed", step=step, lora=str(path))
        acc.wait_for_everyone()  # other processes end once the file exists
        return self.run

    def check_fit(self, p: Prepared) -> None:
        """The estimate per phase in the log, and a warning (log, live panel) when it exceeds the card."""
        from .memory_plan import fit_warning, phases
        from .plan_summary import family_guess

        family = "tiny" if family_guess(self.cfg.model.base) == "tiny" else p.model.family
        est = phases(self.cfg, family)
        self.log("memory estimate by phase: " + ", ".join(f"{k} {v:.1f} GB" for k, v in est.items()))
        fit = fit_warning(self.cfg, family, torch.cuda.get_device_properties(self.cuda).total_memory / 1024**3)
        if fit:
            self.log(f"warning: {fit}")
            self.memory_warning = self.fit_warning = fit
            if self.main:
                self.run.set_status("running", memory_warning=fit)

    def flush(self, pending, acc, step, total, t0, done0) -> float:
        losses = acc.reduce(torch.stack([l for _, l, _ in pending]), reduction="mean").float().cpu().tolist()
        memory = torch.cuda.memory_allocated(self.cuda) if self.cuda else None
        self.meter.note()
        peak = self.meter.peaks.get("training")
        speed = eta = None
        for (s, _, lr), loss in zip(pending, losses):
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"the loss became {loss} at step {s}")
            elapsed = time.time() - t0
            speed = (s - done0) / elapsed if elapsed > 0 else 0.0
            eta = (total - s) / speed if speed > 0 else None
            row = {"step": s, "loss": loss, "lr": lr, "time": time.time()}
            if self.main:
                self.run.append_metrics(row)
            self.emit("step", step=s, total=total, loss=loss, lr=lr, speed=speed, eta=eta, memory=memory,
                      peak_memory=peak)
        now = time.time()
        recent = (now - self.flushed[0]) / (step - self.flushed[1]) if self.flushed and step > self.flushed[1] else None
        self.flushed = (now, step)
        warning = (self.meter.warning(recent) if self.cuda else None) or self.fit_warning  # the fit one stays
        if warning and warning != self.memory_warning:
            self.log(f"warning: {warning}")
        self.memory_warning = warning
        if self.main:  # what a watcher (the app, another tab) shows; it reads this file, never waits on us
            self.run.set_status("running", step=step, total_steps=total, last_loss=losses[-1], speed=speed, eta=eta,
                                memory=memory, peak_memory=peak, memory_by_phase=self.meter.peaks or None,
                                reserved_by_phase=self.meter.reserved or None, memory_warning=warning)
        return losses[-1]


def oom_advice(cfg: Config) -> str:
    tips = []
    if cfg.train.batch_size > 1:
        tips.append(f"lower train.batch_size (now {cfg.train.batch_size})")
    if not cfg.train.gradient_checkpointing:
        tips.append("turn on train.gradient_checkpointing")
    if cfg.dataset.resolution > 512:
        tips.append(f"lower dataset.resolution (now {cfg.dataset.resolution})")
    if cfg.train.optimizer != "adamw8bit":
        tips.append("use train.optimizer=adamw8bit")
    if cfg.train.mixed_precision in ("fp32", "auto"):
        tips.append("use train.mixed_precision=bf16 (or fp16 on older GPUs)")
    return "Out of accelerator memory. Try to " + ", ".join(tips or ["use a smaller rank or a smaller model"]) + "."


def _claim_run(cfg: Config, workspace: Path, run: RunDir | None) -> tuple[RunDir, run_lock.RunLock | None]:
    """The run folder (made when new) and its lock, taken by the main process before it writes anything there.

    A second process on a run that is being trained stops here, having changed nothing. Under `accelerate launch`
    the other processes get the folder, or the refusal, from the main one.
    """
    from accelerate import PartialState

    try:
        cpu = pick_device(cfg.train.device).type == "cpu"
    except LoraLabError:
        if run is None:
            raise  # nothing made yet
        cpu = True  # Job.train reports a device that is not there as this run's failure
    # cpu=True is what lets several CPU processes (gloo) form one run; it must be said at the first call.
    state = PartialState(cpu=cpu)
    lock, error, answer = None, None, [None, None]  # answer: [run folder, refusal], what the others are told
    if state.is_main_process:
        made = run is None
        try:
            if made:
                run = new_run(workspace, cfg.name)
            lock = run_lock.acquire(run.path)
            if made:
                cfg.write(run.config_path)
                run.set_status("running", step=0, total_steps=cfg.train.steps, started=time.time())
            answer[0] = str(run.path)
        except Exception as e:
            error, answer[1] = e, str(e)
            if lock:
                lock.release()
            if made and run is not None:  # a folder without its config is no run: leave none behind
                shutil.rmtree(run.path, ignore_errors=True)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(answer)
    if error is not None:
        raise error
    if answer[1]:
        raise LoraLabError(answer[1])
    return RunDir(Path(answer[0])), lock


def run_job(cfg: Config, workspace: Path, callback: Callback | None = None, control: Control | None = None,
            run: RunDir | None = None) -> RunDir:
    """Train `cfg` in a new run folder, or in `run` from its last checkpoint if it has one.

    Failures end as status 'failed' with advice, and raise. A run another process trains is refused
    (LoraLabError) and left as it is.
    """
    resume = run is not None
    try:
        run, lock = _claim_run(cfg, workspace, run)
    except OSError as e:
        if not (resume and disk_full(e)):
            raise
        # The lock file did not fit (we did hold it, for that instant): the run says why it did not start.
        _record_failure(run, DISK_FULL, DISK_FULL_ADVICE)
        raise LoraLabError(DISK_FULL, DISK_FULL_ADVICE) from None
    job = Job(cfg, run, callback, control)

    def fail(error: str, advice: str):
        if job.main:
            _record_failure(run, error, advice)
        job.emit("status", state="failed", error=error, advice=advice)

    try:
        return job.train(resume)
    except LoraLabError as e:
        fail(e.problem, e.fix)
        raise
    except NonFiniteLoss as e:
        fail(str(e).capitalize() + ".", "Lower train.learning_rate (e.g. by 10x), keep the VAE in fp32, "
             "or use train.mixed_precision=fp32; resume starts from the last good checkpoint.")
        raise LoraLabError(f"Training failed: {e}.", "Lower the learning rate and resume.")
    except torch.OutOfMemoryError:
        advice = oom_advice(cfg)
        fail("Out of accelerator memory.", advice)
        raise LoraLabError("Out of accelerator memory.", advice)
    except KeyboardInterrupt:
        fail("Interrupted.", "Resume the run to continue from its last checkpoint.")
        raise
    except Exception as e:
        if disk_full(e):  # the writes name it (removed_on_failure), whichever library failed
            fail(DISK_FULL, DISK_FULL_ADVICE)
            raise LoraLabError(DISK_FULL, DISK_FULL_ADVICE) from None
        if job.main:
            run.log(traceback.format_exc())
        fail(f"{type(e).__name__}: {e}", "This looks like a bug; the log (log.txt) has details. "
             "Resume continues from the last checkpoint.")
        raise
    finally:
        if lock:
            lock.release()


def _record_failure(run: RunDir, error: str, advice: str) -> None:
    try:
        run.set_status("failed", error=error, advice=advice)
    except OSError:
        pass  # not even in place (a full disk): the app's job manager, or its next start, says the run ended
    run.log(f"FAILED: {error} {advice}")
