"""ComfyUI workflows that load the same base model and LoRAs and make the exported images again: one
sampler chain per image, with its prompt, seed, steps, guidance, sampler, size and LoRA strengths.

Two files, for the two ways ComfyUI opens a workflow:
- the API format (`workflow_api`): what ComfyUI's "Export (API)" writes and its `/prompt` endpoint runs;
- the UI format (`workflow_ui`): what "Save" writes and what opens on the canvas when the file is
  dragged onto it or picked with "Open" (nodes with positions, links, widget values).

ComfyUI draws its starting noise differently from diffusers, so the pictures match in content, not
pixel for pixel.
"""
from __future__ import annotations

from pathlib import PurePath

# LoRA Lab's sampler names → ComfyUI's KSampler sampler_name (all with the "normal" schedule).
SAMPLERS = {"euler_a": "euler_ancestral", "euler": "euler", "ddim": "ddim", "dpmpp_2m": "dpmpp_2m"}

# For the UI format: each node's link inputs (name, type), its widgets in ComfyUI's order, its outputs
# (name, type). The widget order is that of the node's INPUT_TYPES in ComfyUI's nodes.py; KSampler's
# seed widget is followed by the frontend's "control after generate" value.
NODES = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP")], ["lora_name", "strength_model", "strength_clip"],
                   [("MODEL", "MODEL"), ("CLIP", "CLIP")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
}
COLUMN = {"CheckpointLoaderSimple": 0, "LoraLoader": 1, "EmptyLatentImage": 1, "CLIPTextEncode": 2, "KSampler": 3,
          "VAEDecode": 4, "SaveImage": 5}


def workflow_api(images: list[dict]) -> dict:
    """`images`: one dict per image with base (the checkpoint's file name as it lies in ComfyUI's
    models/checkpoints), prompt, negative, seed, steps, guidance, width, height, sampler, loras
    ((file name in models/loras, strength) pairs) and name (the saved image's file name prefix).
    Loaders, LoRA chains, negative prompts and empty latents are shared where images share them."""
    g: dict = {}
    made: dict = {}

    def node(kind: str, key=None, **inputs) -> list:
        if key is not None and (kind, key) in made:
            return made[(kind, key)]
        ref = [str(len(g) + 1), 0]
        g[ref[0]] = {"class_type": kind, "inputs": inputs, "_meta": {"title": kind}}
        if key is not None:
            made[(kind, key)] = ref
        return ref

    for i, im in enumerate(images):
        base = PurePath(im["base"]).name
        ckpt = node("CheckpointLoaderSimple", base, ckpt_name=base)
        model, clip, vae = ckpt, [ckpt[0], 1], [ckpt[0], 2]
        chain: tuple = (base,)
        for name, strength in im.get("loras") or []:
            chain += ((PurePath(name).name, float(strength)),)
            lora = node("LoraLoader", chain, lora_name=PurePath(name).name, strength_model=float(strength),
                        strength_clip=float(strength), model=model, clip=clip)
            model, clip = lora, [lora[0], 1]
        neg = node("CLIPTextEncode", (chain, "negative", im.get("negative") or ""), text=im.get("negative") or "",
                   clip=clip)
        latent = node("EmptyLatentImage", (int(im["width"]), int(im["height"])), width=int(im["width"]),
                      height=int(im["height"]), batch_size=1)
        pos = node("CLIPTextEncode", (chain, "positive", im["prompt"]), text=im["prompt"], clip=clip)
        sampled = node("KSampler", seed=int(im["seed"]), steps=int(im["steps"]), cfg=float(im["guidance"]),
                       sampler_name=SAMPLERS.get(im.get("sampler", "euler_a"), "euler"), scheduler="normal",
                       denoise=1.0, model=model, positive=pos, negative=neg, latent_image=latent)
        pixels = node("VAEDecode", samples=sampled, vae=vae)
        node("SaveImage", filename_prefix=im.get("name") or f"lora-lab_{i:02d}", images=pixels)
    return g


def workflow_ui(api: dict) -> dict:
    """The same graph in ComfyUI's UI (canvas) format: nodes laid out left to right by kind, one row
    per image, with numbered links."""
    ids = {key: n for n, key in enumerate(api, start=1)}
    nodes, links = [], []
    rows: dict[int, int] = {}
    outputs_links: dict[tuple[int, int], list[int]] = {}
    inputs_of: dict[int, list[dict]] = {}
    for key, spec in api.items():
        kind = spec["class_type"]
        link_inputs, _, _ = NODES[kind]
        slots = []
        for slot, (name, typ) in enumerate(link_inputs):
            src_key, src_slot = spec["inputs"][name]
            link_id = len(links) + 1
            links.append([link_id, ids[src_key], src_slot, ids[key], slot, typ])
            outputs_links.setdefault((ids[src_key], src_slot), []).append(link_id)
            slots.append({"name": name, "type": typ, "link": link_id})
        inputs_of[ids[key]] = slots
    for order, (key, spec) in enumerate(api.items()):
        kind, n = spec["class_type"], ids[key]
        _, widgets, outs = NODES[kind]
        col = COLUMN[kind]
        row = rows.get(col, 0)
        rows[col] = row + 1
        values = []
        for w in widgets:
            values.append("fixed" if w == "control_after_generate" else spec["inputs"][w])
        nodes.append({
            "id": n, "type": kind, "pos": [40 + 380 * col, 40 + 300 * row],
            "size": [340, 260 if kind == "KSampler" else 120],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs_of[n],
            "outputs": [{"name": name, "type": typ, "links": outputs_links.get((n, slot), []), "slot_index": slot}
                        for slot, (name, typ) in enumerate(outs)],
            "properties": {"Node name for S&R": kind}, "widgets_values": values,
            "title": spec.get("_meta", {}).get("title", kind)})
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"info": {"name": "LoRA Lab export"}}, "version": 0.4}
