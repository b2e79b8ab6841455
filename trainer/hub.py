"""Share a LoRA on the Hugging Face hub with a model card. The token is used, never stored or logged."""
from __future__ import annotations

import io
from pathlib import Path

from .errors import LoraLabError
from .lora_file import lora_info


def model_card(name: str, info: dict, base: str, images: list[str]) -> str:
    trigger = info.get("trigger") or ""
    lines = ["---", "tags: [lora, stable-diffusion, lora-lab]", f"base_model: {base}" if "/" in base else "",
             "---", f"# {name}", "", f"A {info.get('type', 'LoRA')} for **{info.get('family')}** trained with "
             "LoRA Lab.", "", f"- Trigger word: `{trigger}`" if trigger else "- No trigger word",
             f"- Base model: {base}", f"- Rank {info.get('rank')}, alpha {info.get('alpha')}, {info.get('steps')} steps",
             ""]
    lines += [f"![sample]({p})" for p in images]
    return "\n".join(x for x in lines if x is not None) + "\n"


def push_lora(path: Path, repo_id: str, token: str, images: list) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not repo_id or repo_id.count("/") != 1:
        raise LoraLabError("The repository must be written as you/name.", "For example: alice/my-dog-lora.")
    if not token:
        raise LoraLabError("No access token.", "Create a write token at huggingface.co/settings/tokens and paste it.")
    info = lora_info(path)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_file(path_or_fileobj=str(path), path_in_repo=Path(path).name, repo_id=repo_id)
        names = []
        for i, img in enumerate(images):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            names.append(f"samples/{i}.png")
            api.upload_file(path_or_fileobj=buf.getvalue(), path_in_repo=names[-1], repo_id=repo_id)
        card = model_card(Path(path).stem, info, info.get("base") or "unknown", names)
        api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id)
    except HfHubHTTPError as e:
        raise LoraLabError(f"The hub refused the upload ({e.response.status_code if e.response else 'error'}).",
                           "Check that the token has write access and the repository name is yours.")
    except (OSError, ConnectionError) as e:
        raise LoraLabError(f"Could not reach the Hugging Face hub ({type(e).__name__}).",
                           "You seem to be offline; download the LoRA from the run history instead.")
    return f"https://huggingface.co/{repo_id}"
