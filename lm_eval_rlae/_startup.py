"""Registers the `rlae` model with lm-eval, run at interpreter start-up by `lm_eval_rlae.pth`.

lm-eval 0.4.13 has no plugin discovery, and `lm_eval.api.registry.get_model` only loads the
built-in models while the registry is empty: registering `rlae` early would hide `hf` and the
rest. So a meta-path finder waits for `lm_eval.models` to be imported and adds `rlae`, as a lazy
placeholder, right after it. Start-up imports nothing heavy (no torch, no lm-eval).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_MODELS_MODULE = "lm_eval.models"
_RLAE_TARGET = "lm_eval_rlae.lm:RLAELM"


def register() -> None:
    """Adds `rlae` to lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry

    if "rlae" not in model_registry:
        model_registry.register("rlae", target=_RLAE_TARGET)


class _RegisterAfterModelsImport(importlib.abc.MetaPathFinder):
    """Finds `lm_eval.models` as usual, and registers `rlae` once that module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _MODELS_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if _MODELS_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterModelsImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterModelsImport())


install()
