"""What every tab shares: the workspace (the caller's own), the job manager and where models are found.

What a caller may read or write is decided in access.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.jobs import JobManager

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
    local: bool = True  # served on 127.0.0.1 only, without --share
    models: dict = field(default_factory=dict)  # one loaded base model for the test tab
    visitors: object = None  # Space mode: the signed visitor cookies (identity.Visitors)

    @classmethod
    def create(cls, workspace: Path, extra_model_dir: str | None = None, allow_pickle: bool = False,
               space: bool = False, data_dirs: list[str] | None = None, per_user: bool = False,
               devices: list[str] | None = None, local: bool = True):
        ws = Path(workspace).resolve()
        for sub in SUBDIRS:
            (ws / sub).mkdir(parents=True, exist_ok=True)
        dirs = [ws / "models"] + ([Path(extra_model_dir).expanduser().resolve()] if extra_model_dir else [])
        if space:
            _forget_old_sessions(ws / "sessions")
        data = [] if space else [Path(d).expanduser().resolve() for d in (data_dirs or [])]
        from .identity import Visitors

        return cls(root=ws, jobs=JobManager(ws, devices), model_dirs=dirs, allow_pickle=allow_pickle and not space,
                   space=space, data_dirs=data, per_user=per_user, local=local,
                   visitors=Visitors(ws) if space else None)

    @property
    def workspace(self) -> Path:
        """The workspace of whoever is asking: in Space mode, the visitor's own folder."""
        from .scope import visitor

        return self.workspace_of(visitor.get() if self.space or self.per_user else None)

    def workspace_of(self, who: str | None) -> Path:
        if not who:
            return self.root
        from .identity import folder_name

        ws = self.root / ("sessions" if self.space else "users") / folder_name(who)
        if not ws.exists():
            for sub in SUBDIRS:
                (ws / sub).mkdir(parents=True, exist_ok=True)
        return ws

    def my_slot(self):
        """This user's running (else waiting) job, if any."""
        slots = self.jobs.runs_in(self.workspace)
        return slots[0] if slots else None

    def base_models(self) -> list[str]:
        from .access import base_models

        return base_models(self)

    def load_model(self, spec: str):
        """The base model for generation, kept loaded while the same one is asked for."""
        from trainer.models.load import load_base

        if spec not in self.models:
            self.models.clear()
            self.models[spec] = load_base(spec, allow_pickle=self.allow_pickle)
        return self.models[spec]
