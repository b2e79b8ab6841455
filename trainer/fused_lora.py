"""`train.fused_lora`: the UNet's LoRA attention projections computed together, in far fewer operators.

At batch 1 a fast GPU waits on the host, which launches one or more kernels per operator (issue 20). peft
computes each LoRA layer on its own: the two weights cast to the compute dtype (and their gradients cast
back), the input cast again for the adapter, two matmuls, a scaling multiply and an add, forward and backward,
in every one of SD 1.5's 128 and SDXL's 560 attention projections. Here, for the same adapter weights:
- all the LoRA weights of the UNet come to the compute dtype in one step each way (one `_Weights` call per
  UNet forward: cat, scale, cast; its backward: cat, cast, scale), instead of four casts per layer;
- the projections that read the same input (q, k and v of self-attention; k and v of cross-attention) share
  one down-projection matmul (their A matrices stacked) and one batched up-projection (`bmm`);
- the scaling (alpha / rank) is folded into the down weights, and a single projection adds its LoRA part to
  the base output in the matmul itself (`addmm`) — in attention, and in every other LoRA linear layer of the
  UNet (feed-forward and the transformers' in/out projections: `network.targets: attention_ff` and `all`).
peft stays the owner of the adapter (its parameters, state dict, export and every other algorithm); only the
training-time computation of plain LoRA (no DoRA, no dropout) changes: in diffusers' attention through an
attention processor, diffusers' own extension point, and in the other linear layers through `FusedLinear`, a
subclass of peft's layer (LoRA convolutions keep peft's). The numbers are those of peft's path up to the order of
floating-point sums (tests/test_fused_lora.py: outputs and gradients to 1e-5 in fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

from .adapters import ADAPTER


class Group:
    """LoRA projections of one attention that read the same input."""

    def __init__(self, layers: list):
        self.layers = layers
        self.rank, self.cin = self.down()[0].shape
        self.cout = self.up()[0].shape[0]

    def down(self) -> list[torch.Tensor]:  # asked each time: whatever replaced a parameter, this is the one used
        return [l.lora_A[ADAPTER]._parameters["weight"] for l in self.layers]

    def up(self) -> list[torch.Tensor]:
        return [l.lora_B[ADAPTER]._parameters["weight"] for l in self.layers]

    def uniform(self) -> bool:
        return (all(w.shape == (self.rank, self.cin) for w in self.down())
                and all(w.shape == (self.cout, self.rank) for w in self.up()))


class Plan:
    """Every fused group of a UNet, and the compute-dtype weights of the forward pass being run."""

    def __init__(self, groups: list[Group]):
        self.groups = groups
        self.layers = [l for g in groups for l in g.layers]
        self.weights: tuple | None = None  # (down per group, up per group), kept until the next forward:
        # a checkpointed block recomputes its attention in backward, after the UNet's forward has returned

    def refresh(self, module, args):
        """Pre-hook of the UNet's conv_in (once per UNet forward): this pass's weights, or None where peft's own
        path must run."""
        scale = self.scale()
        if scale is None:
            self.weights = None
            return
        params = [w for g in self.groups for w in g.down()] + [w for g in self.groups for w in g.up()]
        device, base = params[0].device.type, self.layers[0].base_layer
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else getattr(base, "compute_dtype", base.weight.dtype))  # fp8-stored bases compute in another
        out = _Weights.apply(self, dtype, scale, *params)
        n = len(self.groups)
        self.weights = (out[:n], out[n:])

    def scale(self) -> float | None:
        """The layers' scaling, or None when peft's path is needed (adapters off, merged, another adapter).
        Only the first layer is asked: peft and diffusers switch, merge and scale adapters model-wide, and the
        engine never changes them (asking all 560 of SDXL's layers each step would cost milliseconds)."""
        first = self.layers[0]
        if first.disable_adapters or first.merged or first.active_adapters != [ADAPTER]:
            return None
        return first.scaling.get(ADAPTER)


class _Weights(torch.autograd.Function):
    """All fused LoRA weights in the compute dtype at once: per group its stacked down weights (K·r, C_in),
    scaled, and its up weights (K, C_out, r). Backward gathers the groups' gradients into one fp32 tensor per
    kind and hands each parameter its part (the same values as peft's per-layer casts)."""

    @staticmethod
    def forward(ctx, plan: Plan, dtype, scale: float, *params):
        n = len(plan.layers)
        down = torch.cat([p.reshape(-1) for p in params[:n]])
        if scale != 1:
            down = down * scale
        down, up = down.to(dtype), torch.cat([p.reshape(-1) for p in params[n:]]).to(dtype)
        ctx.plan, ctx.scale, ctx.shapes, ctx.downs = plan, scale, [p.shape for p in params], n
        ctx.param_dtype = params[0].dtype  # fp32 under mixed precision: the gradients go back to it
        downs, ups, i, j = [], [], 0, 0
        for g in plan.groups:
            k = len(g.layers)
            downs.append(down[i:i + k * g.rank * g.cin].view(k * g.rank, g.cin))
            piece = up[j:j + k * g.cout * g.rank]  # (C_out, r) alone: indexing a (1, C_out, r) costs a kernel backward
            ups.append(piece.view(k, g.cout, g.rank) if k > 1 else piece.view(g.cout, g.rank))
            i, j = i + k * g.rank * g.cin, j + k * g.cout * g.rank
        return (*downs, *ups)

    @staticmethod
    def backward(ctx, *grads):
        n, shapes, downs = len(ctx.plan.groups), ctx.shapes, ctx.downs
        down = torch.cat([g.reshape(-1) for g in grads[:n]]).to(ctx.param_dtype)
        if ctx.scale != 1:
            down = down.mul_(ctx.scale)
        up = torch.cat([g.reshape(-1) for g in grads[n:]]).to(ctx.param_dtype)
        sizes = [s.numel() for s in shapes]
        parts = [*torch.split(down, sizes[:downs]), *torch.split(up, sizes[downs:])]
        return (None, None, None, *(p.view(s) for p, s in zip(parts, shapes)))


def project(group: Group, index: int, weights, x: torch.Tensor) -> list[torch.Tensor]:
    """The group's layers applied to `x`: base output plus LoRA, for each."""
    down, up = weights[0][index], weights[1][index]
    x = x.to(down.dtype)  # once for every layer of the group (autocast would cast it for each matmul)
    lead, k = x.shape[:-1], len(group.layers)
    h = torch.mm(x.reshape(-1, group.cin), down.t())  # (M, K·r)
    bases = [l.base_layer(x) for l in group.layers]
    if k == 1:
        return [torch.addmm(bases[0].reshape(-1, group.cout), h, up.t()).view(*lead, group.cout)]
    # (K, C_out, r) @ (K, r, M): the up weights untransposed, so their gradient comes out in their layout
    lora = torch.bmm(up, h.view(-1, k, group.rank).permute(1, 2, 0))
    return [b + part.t().view(b.shape) for b, part in zip(bases, lora.unbind(0))]


class FusedLoRAProcessor:
    """diffusers' AttnProcessor2_0 with the projections computed by group (see the module's docstring)."""

    def __init__(self, plan: Plan, first: int, cross: bool, original):
        self.plan, self.first, self.cross, self.original = plan, first, cross, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        w = self.plan.weights
        if w is None or args or kwargs or (encoder_hidden_states is not None) != self.cross:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        ndim = hidden_states.ndim
        if ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        i = self.first
        if not self.cross:  # self-attention: q, k, v from one input
            query, key, value = project(self.plan.groups[i], i, w, hidden_states)
            i += 1
        else:
            (query,) = project(self.plan.groups[i], i, w, hidden_states)
            key, value = project(self.plan.groups[i + 1], i + 1, w, encoder_hidden_states)
            i += 2
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        (hidden_states,) = project(self.plan.groups[i], i, w, hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1:  # 1 in every SD UNet: a division by one is still a kernel
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


class FusedLinear(LoraLinear):
    """peft's LoRA linear layer, computing its LoRA part from the plan's weights (`fused_at`: plan, group)
    and adding it in the matmul; peft's own forward where the plan has no weights for this pass."""

    def forward(self, x, *args, **kwargs):
        plan, index = self.fused_at
        w = plan.weights
        if w is None or args or kwargs:
            return super().forward(x, *args, **kwargs)
        return project(plan.groups[index], index, w, x)[0]


def _plain_lora(layer) -> bool:
    return (isinstance(layer, LoraLinear) and ADAPTER in layer.lora_A and not layer.use_dora.get(ADAPTER)
            and isinstance(layer.lora_dropout[ADAPTER], torch.nn.Identity) and not layer.lora_bias.get(ADAPTER))


def _fusable(attn) -> bool:
    """Attention as the SD UNets have it: no norms or masks of its own, plain LoRA on its four projections."""
    return (attn.spatial_norm is None and attn.group_norm is None and attn.norm_cross is None
            and attn.norm_q is None and attn.norm_k is None and not getattr(attn, "added_kv_proj_dim", None)
            and all(_plain_lora(l) for l in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])))


def install(unet) -> Plan | None:
    """Give each fusable attention of `unet` the fused processor; returns the plan (None if none was)."""
    from diffusers.models.attention_processor import Attention

    groups, processors = [], []
    for attn in unet.modules():
        if not isinstance(attn, Attention) or not _fusable(attn):
            continue
        first = len(groups)
        if attn.is_cross_attention:
            groups += [Group([attn.to_q]), Group([attn.to_k, attn.to_v])]
        else:
            groups.append(Group([attn.to_q, attn.to_k, attn.to_v]))
        groups.append(Group([attn.to_out[0]]))
        processors.append((attn, first, attn.is_cross_attention))
    in_attention = {id(l) for g in groups for l in g.layers}
    singles = [m for m in unet.modules() if _plain_lora(m) and id(m) not in in_attention]  # feed-forward, proj_in/out
    groups += [Group([m]) for m in singles]
    if not groups or not all(g.uniform() for g in groups):
        return None
    plan = Plan(groups)
    for attn, first, cross in processors:
        attn.set_processor(FusedLoRAProcessor(plan, first, cross, attn.processor))
    for index, layer in enumerate(singles, start=len(groups) - len(singles)):
        layer.__class__ = FusedLinear  # as base_weights.py swaps a layer's class: state dicts and peft stay as they were
        layer.fused_at = (plan, index)
    # on conv_in, the UNet's first layer, not the UNet: inside diffusers' forward, after its per-call LoRA scale
    # (cross_attention_kwargs={"scale": s}) is applied to the layers, and outside any checkpointed block
    unet.conv_in.register_forward_pre_hook(plan.refresh)
    return plan
