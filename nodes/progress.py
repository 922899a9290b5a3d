"""The core's progress callback as a ComfyUI progress bar, live text and cancel point."""
from __future__ import annotations

import comfy.model_management
import comfy.utils

STEPS = 1000


def node_progress(node_id: str | None, label: str):
    """callback(dict) for the core: moves the node's bar, shows the stage, raises on cancel."""
    bar = comfy.utils.ProgressBar(STEPS, node_id=node_id)

    def callback(event: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(int(event.get("overall", 0.0) * STEPS), STEPS)
        _send_text(f"{label}: {event.get('stage', '')} {event.get('done', 0)}/{event.get('total', 0)}", node_id)

    return callback


def send_text(text: str, node_id: str | None) -> None:
    """Live text on the node (the last one stays visible after the run)."""
    _send_text(text, node_id)


def _send_text(text: str, node_id: str | None) -> None:
    if node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:  # ComfyUI used as a library, no server
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(text, node_id)
