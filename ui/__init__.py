"""The Gradio app: one module per tab plus the shell. No training logic lives here."""
from ui import fast_import

fast_import.install()  # before any tab module imports gradio
