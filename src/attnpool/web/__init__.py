"""The knowledge base's web page and JSON API (``attnpool kb serve``): search, explain and history search over a
:class:`attnpool.kb.KnowledgeBase`, with chunks highlighted by attention weight and the pooling's diagnostics.

Needs the ``web`` extra (FastAPI, uvicorn). Importing this package imports neither; :func:`create_app` does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def create_app(kb: Any, **kwargs: Any) -> Any:
    """The FastAPI app over ``kb``; see :func:`attnpool.web.app.create_app`."""
    from attnpool.web.app import create_app as _create_app

    return _create_app(kb, **kwargs)
