"""Make `import gradio` about 2.5 seconds faster (of about 5 on a 2-core machine).

Two things Gradio does on every import serve only its own development and documentation:

- its component metaclass calls `gradio.component_meta.create_or_modify_pyi` for every component
  class: it re-reads and re-parses each component's source file with `ast` to regenerate the
  `.pyi` type stubs in site-packages (3.4 s of a 7 s profiled import here);
- `EventListener.set_doc` compiles a Jinja template for each of ~200 event docstrings, only to
  put the component's name where the docstring says `{{ component }}` (0.4 s).

There are no settings to turn them off, so `install()` patches them as soon as their module has
run, before any component class is built: no stubs are written, and docstrings get the name by a
plain string replace (the same text). Nothing else in Gradio is changed.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _skip_stubs(module) -> None:
    if hasattr(module, "create_or_modify_pyi"):
        module.create_or_modify_pyi = lambda *args, **kwargs: None


def _plain_docs(module) -> None:
    listener = getattr(module, "EventListener", None)
    if listener is None or not hasattr(listener, "set_doc"):
        return

    def set_doc(self, component: str) -> None:
        if self.listener.__doc__:
            self.listener.__doc__ = self.listener.__doc__.replace("{{ component }}", component)

    listener.set_doc = set_doc


PATCHES = {"gradio.component_meta": _skip_stubs, "gradio.events": _plain_docs}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.waiting = dict(PATCHES)

    def find_spec(self, name, path, target=None):
        patch = self.waiting.pop(name, None)
        if patch is None:
            return None
        if not self.waiting:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the normal finders locate the real module
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Call before the first `import gradio`; does nothing if Gradio is already imported."""
    if "gradio" in sys.modules or any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PatchAfterImport())
