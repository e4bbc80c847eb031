"""Ferret: refer and ground anything anywhere at any granularity.

Public API (imported lazily so that `import ferret` stays cheap):
    FerretConfig, FerretLlamaForCausalLM, FerretProcessor, load_pretrained_model
"""

__version__ = "0.1.0"

_EXPORTS = {
    "FerretConfig": "ferret.model.configuration",
    "FerretLlamaForCausalLM": "ferret.model.modeling",
    "FerretProcessor": "ferret.processing",
    "load_pretrained_model": "ferret.model.builder",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ferret' has no attribute {name!r}")
