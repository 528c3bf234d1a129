"""Entry points in other frameworks' registries. `install()` (called by `import sq_plugin`) registers
`quant_method: "stablequant"` with transformers as soon as transformers' quantizer registry is imported, without
importing transformers itself (that would cost `import sq_plugin` seconds: it pulls in torch and torchao)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

_REGISTRY_MODULE = "transformers.quantizers.auto"
_registered = False


def register_with_transformers() -> None:
    """Register the config and the HfQuantizer (idempotent)."""
    global _registered
    if _registered:
        return
    ours = sys.modules.get("sq_plugin.integrations.transformers")
    if ours is not None and not getattr(ours, "READY", False):
        return  # it is being imported (and imported transformers' registry): it registers itself at its end
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    from sq_plugin.integrations.transformers import QUANT_METHOD, StableQuantConfig, StableQuantHfQuantizer

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(StableQuantConfig)
        register_quantizer(QUANT_METHOD)(StableQuantHfQuantizer)
    _registered = True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers' quantizer registry is being imported, it wraps that module's
    loader so that the registration runs right after the module has executed."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _REGISTRY_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            original_exec(module)
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]
            register_with_transformers()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else when it is."""
    if _REGISTRY_MODULE in sys.modules:
        register_with_transformers()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
