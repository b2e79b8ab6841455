"""Helpers for attacking a running app as another user would: what the victim has, what came back."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

SECRET = "BOBSECRET"  # put in the victim's captions and config: it must never reach the attacker


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` with a hash of its bytes: compared before and after an attack."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def _file_leaks(path: Path, victim_hashes: set[str]) -> bool:
    data = path.read_bytes()
    if SECRET.encode() in data or hashlib.sha1(data).hexdigest() in victim_hashes:
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return any(SECRET.encode() in z.read(n) or hashlib.sha1(z.read(n)).hexdigest() in victim_hashes
                       for n in z.namelist())
    return False


def leaks(result, victim_files: dict[str, str]) -> list[str]:
    """What in an endpoint's result belongs to the victim: the secret, or a file (or zip member) with the
    bytes of one of the victim's files. (The victim's paths may appear: an error quotes what was sent.)"""
    found = []
    if SECRET in json.dumps(result, default=str):
        found.append("secret in the result")
    hashes = set(victim_files.values())

    def files(x):
        if isinstance(x, str) and len(x) < 4096 and Path(x).is_file():
            yield Path(x)
        elif isinstance(x, dict):
            for v in x.values():
                yield from files(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from files(v)
    found += [f"victim's bytes in {p}" for p in files(result) if _file_leaks(p, hashes)]
    return found


def arguments(params: list[dict], values: list[str], rotation: int) -> list:
    """One call's arguments: every text parameter an attack value (rotating through `values`), numbers 1,
    switches off, files a victim's path as if uploaded; fixed-choice dropdowns get the attack value in
    rotation 0 and their first choice otherwise, so the other parameters are checked too."""
    args = []
    for i, p in enumerate(params):
        kind = p["python_type"]["type"]
        value = values[(i + rotation) % len(values)]
        if kind in ("int", "float"):
            args.append(1)
        elif kind == "bool":
            args.append(False)
        elif "filepath" in kind:
            fake = {"path": value, "meta": {"_type": "gradio.FileData"}, "orig_name": "x.safetensors"}
            args.append([fake] if kind.startswith("list") else fake)
        elif kind.startswith("Literal[") and kind != "Literal[]" and rotation:
            args.append(kind[len("Literal['"):].split("'", 1)[0])
        else:
            args.append(value)
    return args


def sweep(client, victim_files: dict[str, str], values: list[str], rotations: int = 3, skip=()) -> dict[str, list[str]]:
    """Call every named endpoint of the app with the attack values; returns endpoint -> outcomes.

    Each outcome is 'ok' or the error's message. Raises AssertionError naming every leak found."""
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    outcomes, problems = {}, []
    for name, ep in api.items():
        if name in skip:
            continue
        for r in range(rotations if ep["parameters"] else 1):
            args = arguments(ep["parameters"], values, r)
            try:
                result = client.submit(*args, api_name=name).result(timeout=180)
                outcome = "ok"
            except Exception as e:  # a refusal is what we hope for; it must not carry the victim's data
                result, outcome = str(e), str(e)
            outcomes.setdefault(name, []).append(outcome[:200])
            problems += [f"{name} {args!r:.200}: {leak}" for leak in leaks(result, victim_files)]
            if "Traceback" in outcome:
                problems.append(f"{name}: a traceback reached the caller")
    assert not problems, "\n".join(problems)
    return outcomes


def fetch(url: str, path, cookie: str, route: str = "file=") -> int:
    """The HTTP status of one of Gradio's file routes (`file=PATH`, `file/PATH`) for `path`, asked with `cookie`."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{url}gradio_api/{route}{path}", headers={"Cookie": cookie})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
