"""The core's progress callback as a ComfyUI progress bar, live text and cancel point."""
from __future__ import annotations

import time

import comfy.model_management
import comfy.utils

STEPS = 1000
SEND_EVERY = 0.1  # seconds between bar/text updates: the core may report hundreds of times a second on a GPU


def node_progress(node_id: str | None, label: str):
    """callback(dict) for the core: raises on cancel at every call; moves the node's bar and
    shows the event (describe) at every new stage and at most every SEND_EVERY seconds."""
    bar = comfy.utils.ProgressBar(STEPS, node_id=node_id)
    last = {"stage": None, "time": 0.0}

    def callback(event: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        now = time.monotonic()
        if event.get("stage") == last["stage"] and now - last["time"] < SEND_EVERY:
            return
        last.update(stage=event.get("stage"), time=now)
        bar.update_absolute(int(event.get("overall", 0.0) * STEPS), STEPS)
        _send_text(f"{label}: {describe(event)}", node_id)

    return callback


def describe(event: dict) -> str:
    """One line for a progress event, e.g. "search · proxy: encoding 512/20,000 words ·
    1,036 of at most 41,072 model evaluations"."""
    parts = [str(event.get("stage", ""))]
    if event.get("note"):
        parts.append(str(event["note"]))
    elif "done" in event:
        parts.append(f"{event['done']}/{event.get('total', 0)}")
    if event.get("planned"):
        parts.append(f"{event.get('evaluations', 0):,} of at most {event['planned']:,} model evaluations")
    return " · ".join(parts)


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
