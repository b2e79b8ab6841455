"""An exponential moving average of the adapter weights (`train.ema`), with diffusers' EMAModel.

EMAModel warms up: its n-th update averages with decay min((1 + n) / (10 + n), train.ema_decay), so the
first updates follow the weights closely. Its state (average, update count) goes into each checkpoint, so a
resumed run continues the same average; the end of the run exports it as <name>-ema.safetensors.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class AdapterEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int, on_cpu: bool):
        from diffusers.training_utils import EMAModel

        self.params, self.every, self.on_cpu = params, every, on_cpu
        self.ema = EMAModel(self._source(), decay=decay)

    def _source(self) -> list[torch.nn.Parameter]:
        if not self.on_cpu:
            return self.params
        # EMAModel averages only weights that require a gradient (it copies the others): the CPU copies say so
        return [torch.nn.Parameter(p.detach().to("cpu", torch.float32)) for p in self.params]

    def update(self, step: int) -> None:
        if step % self.every == 0:
            self.ema.step(self._source())

    @property
    def updates(self) -> int:
        return self.ema.optimization_step

    @contextmanager
    def applied(self):
        """Within: the adapter weights are the average (to export it); after: the trained ones again."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def state_dict(self) -> dict:
        state = self.ema.state_dict()
        state["shadow_params"] = [t.detach().cpu() for t in state["shadow_params"]]
        return state

    def load_state_dict(self, state: dict) -> None:
        device = "cpu" if self.on_cpu else self.params[0].device
        self.ema.load_state_dict({**state, "shadow_params": [t.to(device) for t in state["shadow_params"]]})
