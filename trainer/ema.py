"""An exponential moving average of the adapter weights (`train.ema`), with diffusers' EMAModel.

EMAModel warms up: its first update copies the weights, its n-th averages with decay min(n / (n + 9),
train.ema_decay), so early on the average covers about the last n / 9 updates (0.999 is reached after about
9,000 updates; a 1,500-step run ends near 0.994). Its state (average, update count) goes into each checkpoint, so a
resumed run continues the same average; the end of the run exports it as <name>-ema.safetensors.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class AdapterEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int, on_cpu: bool):
        from diffusers.training_utils import EMAModel

        self.params, self.every, self.on_cpu, self.decay = params, every, on_cpu, decay
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
        self.ema.decay = self.decay  # EMAModel takes the checkpoint's; a resumed run goes on with the config's
