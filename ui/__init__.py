"""The Gradio app: one module per tab plus the shell. No training logic lives here."""
