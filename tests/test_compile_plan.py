"""train.compile: auto compiles (on a CUDA GPU) only runs long enough to repay the first step's compile; old
run folders and presets with compile: true/false still load."""
from types import SimpleNamespace

import pytest

from trainer.compile_plan import PAYS_AFTER_STEPS, decide
from trainer.config import LoraLabError, config_from_dict, resolve

CUDA, CPU = SimpleNamespace(type="cuda"), SimpleNamespace(type="cpu")


@pytest.mark.parametrize("old,new", [(True, "on"), (False, "off"), ("true", "on"), ("false", "off"), ("auto", "auto")])
def test_compile_true_and_false_of_older_configs_mean_on_and_off(old, new):
    assert config_from_dict({"train": {"compile": old}}).train.compile == new
    assert resolve(sets=[f"train.compile={str(old).lower()}"]).train.compile == new


def test_an_unknown_compile_value_is_refused_with_the_choices():
    with pytest.raises(LoraLabError, match="auto, on, off"):
        config_from_dict({"train": {"compile": "sometimes"}})


def test_auto_compiles_long_gpu_runs_only():
    cfg = resolve()
    assert cfg.train.compile == "auto"
    cfg.train.steps = PAYS_AFTER_STEPS
    on, said = decide(cfg, CUDA, offloaded=False)
    assert on and "repay its first step" in said
    cfg.train.steps = 500
    on, said = decide(cfg, CUDA, offloaded=False)
    assert not on and "pays back from about 2000 steps" in said
    assert decide(cfg, CPU, offloaded=False) == (False, "")  # auto on the CPU: nothing to say
    cfg.train.compile = "on"
    assert decide(cfg, CUDA, offloaded=False)[0]
    assert decide(cfg, CPU, offloaded=False) == (False, "train.compile: not used on the CPU (it is for GPUs)")
    assert not decide(cfg, CUDA, offloaded=True)[0]
    cfg.train.compile = "off"
    cfg.train.steps = 10 * PAYS_AFTER_STEPS
    assert decide(cfg, CUDA, offloaded=False) == (False, "")


@pytest.mark.parametrize("stored,fused", [(False, False), (True, True)])  # each case compiles for about a minute
def test_the_compiled_graph_gives_the_eager_gradients(stored, fused, tmp_path):
    """The engine's compile (static graph per shape) with inductor's graph capture and partitioning, the part
    that is correct on the CPU (its CPU code generation is not: tests/bench/check_compile.py), on the demo UNet
    with a LoRA on every layer, plain and with both fp8-stored base weights (their autograd function traced) and
    the fused LoRA attention (its weights' autograd function and processor traced) — the way the engine runs
    a small-card preset."""
    import torch

    from tests.test_small_cards import adapted_unet, step_inputs
    from trainer.adapters import adapter_parameters
    from trainer.base_weights import store_weights
    from trainer.compile_plan import compiled

    model = adapted_unet()
    if stored:
        store_weights(model.unet, torch.float8_e4m3fn, torch.float32)
    if fused:
        from trainer import fused_lora

        assert fused_lora.install(model.unet)
    x, t, emb = step_inputs(model)
    model.unet.train()

    def grads(unet):
        model.unet.zero_grad(set_to_none=True)
        unet(x, t, emb).sample.square().mean().backward()
        return [p.grad.clone() for p in adapter_parameters(model.unet)]

    eager = grads(model.unet)
    graph = grads(compiled(model.unet, tmp_path, 1, backend="aot_eager_decomp_partition"))
    assert all(g.abs().max() > 0 for g in graph)  # every LoRA tensor got its gradient
    worst = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(eager, graph))
    assert worst < 1e-4, worst
