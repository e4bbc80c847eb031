"""Serving Ferret: a controller that routes requests to model workers, the workers, a Gradio UI, a CLI and an
OpenAI-style API.

Modules (each runnable with ``python -m``):

* ``ferret.serve.protocol``   — the request schema shared by worker, API and UI; the ``\\0``-framed JSON stream.
* ``ferret.serve.controller`` — worker registry, heartbeats, dispatch, and a streaming proxy.

This package imports nothing heavy on purpose: the controller must start without torch or the model.
"""
