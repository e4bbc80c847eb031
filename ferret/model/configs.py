"""Kept so existing imports work: the named configurations (``ferret_7b``, ``ferret_13b``, ``small``) live beside
`FerretConfig` in `ferret.model.configuration`, and ``build_model`` (a randomly initialised model) in
`ferret.model.modeling`."""

from __future__ import annotations

from typing import Any

from ferret.model.configuration import VICUNA_VOCAB, ferret_7b, ferret_13b, small

__all__ = ["VICUNA_VOCAB", "build_model", "ferret_7b", "ferret_13b", "small"]


def __getattr__(name: str) -> Any:
    # build_model lives with the model; imported on first use so that this module stays free of torch.
    if name == "build_model":
        from ferret.model.modeling import build_model

        return build_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
