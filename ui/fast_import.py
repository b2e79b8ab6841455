"""Make `import gradio` about 2 seconds faster (of about 5 on a 2-core machine).

Gradio's component metaclass calls `gradio.component_meta.create_or_modify_pyi` for every component
class on every import: it re-reads and re-parses each component's source file with `ast` to
regenerate the `.pyi` type stubs in site-packages. That is a developer convenience for Gradio's own
repository; for an installed app it only costs start-up time (3.4 s of a 7 s profiled import here).
There is no setting to turn it off, so `install()` swaps the function for a no-op as soon as that
module has run, before any component class is built. Nothing else in Gradio is changed.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TARGET = "gradio.component_meta"


class _SkipStubRegeneration(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # one use; the normal finders locate the real module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if hasattr(module, "create_or_modify_pyi"):
                module.create_or_modify_pyi = lambda *args, **kwargs: None

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Call before the first `import gradio`; does nothing if Gradio is already imported."""
    if _TARGET in sys.modules or any(isinstance(f, _SkipStubRegeneration) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _SkipStubRegeneration())
