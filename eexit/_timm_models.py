"""Register eexit's own timm models (T2T-ViT, the Dynamic Perceiver) whenever timm is imported, without importing it.

``timm.create_model("t2t_vit_14")`` must work after ``import eexit``, but importing timm (and torchvision behind
it) on every ``import eexit`` would cost about a second that most users of eexit never need. So the registration
runs at the moment timm itself is imported: at once if it already is, otherwise from a finder on ``sys.meta_path``
that lets the normal import of ``timm`` happen and then imports eexit's model modules (which register their
variants with timm's registry). Nothing else about the import of timm changes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

__all__ = ["install"]

_MODEL_MODULES = ("eexit.models.t2t_vit", "eexit.models.dynamic_perceiver")


def _register() -> None:
    for name in _MODEL_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # never let eexit break the user's `import timm`
            warnings.warn(f"eexit could not register its timm models ({name}: {err!r}).", RuntimeWarning, stacklevel=2)


class _LoaderThenRegister(importlib.abc.Loader):
    """Runs the real loader of ``timm``, then registers eexit's models with the module it built."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _register()


class _TimmFinder(importlib.abc.MetaPathFinder):
    """Finds ``timm`` as the other finders would and wraps its loader (once; it then leaves ``sys.meta_path``)."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # one registration is enough, and the search below must not find us again
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _LoaderThenRegister(spec.loader)
        return spec


def install() -> None:
    """Arrange for eexit's timm models to be registered as soon as timm is imported (at once if it is)."""
    if "timm" in sys.modules:
        _register()
    elif not any(isinstance(finder, _TimmFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TimmFinder())
