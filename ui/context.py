"""What every tab shares: the workspace, the job manager, where models are found, and path checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import LoraLabError
from trainer.jobs import JobManager

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")


@dataclass
class AppContext:
    workspace: Path
    jobs: JobManager
    model_dirs: list[Path] = field(default_factory=list)
    allow_pickle: bool = False
    models: dict = field(default_factory=dict)  # one loaded base model for the test tab

    @classmethod
    def create(cls, workspace: Path, extra_model_dir: str | None = None, allow_pickle: bool = False):
        ws = Path(workspace).resolve()
        for sub in ("runs", "datasets", "models", "loras", "exports"):
            (ws / sub).mkdir(parents=True, exist_ok=True)
        dirs = [ws / "models"] + ([Path(extra_model_dir).expanduser().resolve()] if extra_model_dir else [])
        return cls(workspace=ws, jobs=JobManager(ws), model_dirs=dirs, allow_pickle=allow_pickle)

    def base_models(self) -> list[str]:
        """Models a user can pick: tiny demos, files and diffusers folders in the model folders."""
        found = ["tiny-demo", "tiny-demo-xl"]
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
        if must_exist and not p.exists():
            raise LoraLabError(f"{text} does not exist.", "Check the path (it is on the machine running LoRA Lab).")
        return p

    def dataset_source(self, text: str) -> str:
        """A hub dataset id as it is; anything else a checked local path."""
        t = (text or "").strip()
        if t.count("/") == 1 and not t.startswith((".", "/", "~")) and not (self.workspace / t).exists():
            return t
        return str(self.user_path(t))

    def load_model(self, spec: str):
        """The base model for generation, kept loaded while the same one is asked for."""
        from trainer.models.load import load_base

        if spec not in self.models:
            self.models.clear()
            self.models[spec] = load_base(spec, allow_pickle=self.allow_pickle)
        return self.models[spec]
