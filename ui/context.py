"""What every tab shares: the workspace, the job manager, where models are found, and path checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import LoraLabError
from trainer.jobs import JobManager

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")


SUBDIRS = ("runs", "datasets", "models", "loras", "exports")
SESSION_DAYS = 2


def _forget_old_sessions(root: Path) -> None:
    """Space visitors' folders are kept for a couple of days, then removed at the next start."""
    import shutil
    import time

    if root.is_dir():
        for d in root.iterdir():
            if time.time() - d.stat().st_mtime > SESSION_DAYS * 86400:
                shutil.rmtree(d, ignore_errors=True)


@dataclass
class AppContext:
    root: Path
    jobs: JobManager
    model_dirs: list[Path] = field(default_factory=list)
    allow_pickle: bool = False
    space: bool = False  # Hugging Face Space mode: uploads only, a workspace per session, caps
    data_dirs: list[Path] = field(default_factory=list)  # folders the UI may read besides the workspace
    per_user: bool = False  # a lab server: each logged-in user has a workspace of their own
    models: dict = field(default_factory=dict)  # one loaded base model for the test tab

    @classmethod
    def create(cls, workspace: Path, extra_model_dir: str | None = None, allow_pickle: bool = False,
               space: bool = False, data_dirs: list[str] | None = None, per_user: bool = False,
               devices: list[str] | None = None):
        ws = Path(workspace).resolve()
        for sub in SUBDIRS:
            (ws / sub).mkdir(parents=True, exist_ok=True)
        dirs = [ws / "models"] + ([Path(extra_model_dir).expanduser().resolve()] if extra_model_dir else [])
        if space:
            _forget_old_sessions(ws / "sessions")
        data = [] if space else [Path(d).expanduser().resolve() for d in (data_dirs or [])]
        return cls(root=ws, jobs=JobManager(ws, devices), model_dirs=dirs, allow_pickle=allow_pickle and not space,
                   space=space, data_dirs=data, per_user=per_user)

    def allowed_roots(self) -> list[Path]:
        if self.space:
            return [self.workspace.resolve()]
        return [self.workspace, *self.model_dirs, *self.data_dirs]

    @property
    def workspace(self) -> Path:
        """The workspace of whoever is asking: in Space mode, the visitor's own folder."""
        from .space import visitor

        who = visitor.get() if self.space or self.per_user else None
        if not who:
            return self.root
        from trainer.runs import safe_name

        ws = self.root / ("sessions" if self.space else "users") / safe_name(who)
        if not ws.exists():
            for sub in SUBDIRS:
                (ws / sub).mkdir(parents=True, exist_ok=True)
        return ws

    def my_slot(self):
        """This user's running (else waiting) job, if any."""
        slots = self.jobs.runs_in(self.workspace)
        return slots[0] if slots else None

    def base_models(self) -> list[str]:
        """Models a user can pick: tiny demos, files and diffusers folders in the model folders."""
        found = ["tiny-demo", "tiny-demo-xl"]
        if self.space:
            import os

            return found + [m for m in os.environ.get("LORA_LAB_SPACE_MODELS", "").split(",") if m.strip()]
        for d in self.model_dirs:
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES or (p / "model_index.json").exists():
                    found.append(str(p))
        return found

    def loras(self) -> list[str]:
        """LoRA files of finished runs and of the workspace's loras folder, newest first."""
        from trainer.runs import list_runs

        out = []
        for run in list_runs(self.workspace):
            lora = run.status().get("lora")
            if lora and (run.path / lora).exists():
                out.append(str(run.path / lora))
        out += [str(p) for p in sorted((self.workspace / "loras").glob("*.safetensors"))]
        return out

    def user_path(self, text: str, must_exist: bool = True) -> Path:
        """A path typed by the user, resolved; a clear message when it does not exist."""
        text = (text or "").strip().strip('"')
        if not text:
            raise LoraLabError("No path given.", "Type or paste a folder path.")
        p = Path(text).expanduser()
        if not p.is_absolute():
            p = self.workspace / p
        p = p.resolve()
        # resolve() has followed every symlink and '..', so this also stops escapes through links.
        inside = lambda root: root == p or root in p.parents  # noqa: E731
        others = (self.space or self.per_user) and inside(self.root) and not inside(self.workspace.resolve())
        if others or not any(inside(root) for root in self.allowed_roots()):
            if self.space:
                raise LoraLabError("This is a shared demo: folders on the server are not available.",
                                   "Upload your images (or a zip) in the Dataset tab instead.")
            raise LoraLabError(f"{text} is outside the folders LoRA Lab may use.",
                               "Put it in the workspace, or start the app with --data-dir pointing at its folder "
                               f"(allowed now: {', '.join(map(str, self.allowed_roots()))}).")
        if must_exist and not p.exists():
            raise LoraLabError(f"{text} does not exist.", "Check the path (it is on the machine running LoRA Lab).")
        return p

    def dataset_source(self, text: str) -> str:
        """A hub dataset id as it is; anything else a checked local path."""
        t = (text or "").strip()
        if not self.space and t.count("/") == 1 and not t.startswith((".", "/", "~")) and not (self.workspace / t).exists():
            return t
        return str(self.user_path(t))

    def check_start(self, cfg) -> None:
        """Space-mode caps, checked before a run starts."""
        if not self.space:
            return
        from .space import MAX_IMAGES, MAX_STEPS

        if cfg.model.base not in self.base_models():
            raise LoraLabError(f"The demo offers only these models: {', '.join(self.base_models())}.",
                               "Pick one of them, or install LoRA Lab on your own machine for any model.")
        if cfg.train.steps > MAX_STEPS:
            raise LoraLabError(f"This demo allows at most {MAX_STEPS} steps (asked: {cfg.train.steps}).",
                               f"Set steps to {MAX_STEPS} or fewer.")
        from trainer.data.images import IMAGE_EXTS

        source = Path(cfg.dataset.source)
        images = [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTS] if source.is_dir() else []
        if len(images) > MAX_IMAGES:
            raise LoraLabError(f"This demo trains on at most {MAX_IMAGES} images (the dataset has {len(images)}).",
                               "Upload fewer images.")

    def load_model(self, spec: str):
        """The base model for generation, kept loaded while the same one is asked for."""
        from trainer.models.load import load_base

        if spec not in self.models:
            self.models.clear()
            self.models[spec] = load_base(spec, allow_pickle=self.allow_pickle)
        return self.models[spec]
