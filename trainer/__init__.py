"""LoRA Lab's training engine. No UI code lives here; the app and the CLI call the same functions."""
from .config import Config, config_from_dict, load, resolve  # noqa: F401
from .errors import LoraLabError  # noqa: F401
