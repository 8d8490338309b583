"""Serving plans over HTTP (KServe v2 / Triton protocol) on Ray Serve, with Kiln's own dynamic batcher.

`kiln serve MODEL.kiln ...` (kiln.serve.cli) or, from Python::

    from kiln.serve import ServeConfig, prepare, start
    cfg = ServeConfig(plans=["resnet50.kiln"], max_batch=16)
    server = start(cfg, prepare(cfg))   # returns once the models answer; server.stop() removes them

Importing this package does not import Ray: `protocol`, `model` and `batching` work without it; `start`
imports Ray on first use. See docs/SERVING.md.
"""
from __future__ import annotations

from typing import Any

from kiln.serve.config import ServeConfig

__all__ = ["ServeConfig", "prepare", "start"]


def __getattr__(name: str) -> Any:
    if name == "prepare":
        from kiln.serve.plans import prepare
        return prepare
    if name == "start":
        from kiln.serve.launch import start
        return start
    raise AttributeError(f"module 'kiln.serve' has no attribute {name!r}")
