"""Errors a user can act on. A GPU out-of-memory error names the node inputs that lower the
memory an audit or an evidence grid needs.

The new error is still an out-of-memory error (a torch.OutOfMemoryError), so ComfyUI's executor
handles it as it handles its own: it unloads the loaded models and adds its memory tip. The
input models are clones inside the pack and come out unchanged.
"""
from __future__ import annotations

import contextlib

import torch

from . import compat


class DriftScopeOutOfMemory(torch.OutOfMemoryError):
    """The GPU ran out of memory; the message says which inputs to lower."""


@contextlib.contextmanager
def out_of_memory_advice(node: str, advice: str):
    """Turn an out-of-memory error inside the block into one that names what to lower.
    `advice` lists the inputs with their current values, e.g. "lower micro_batch (now 8)"."""
    try:
        yield
    except DriftScopeOutOfMemory:
        raise
    except Exception as err:  # the cancel (a BaseException since ComfyUI 0.20) passes through
        if not compat.is_out_of_memory(err):
            raise
        first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DriftScopeOutOfMemory(
            f"{node} ran out of GPU memory ({first_line}). To fit, {advice}. "
            "The input models are unchanged."
        ) from err


def audit_advice(micro_batch: int, width: int, height: int, mode: str, gradient_checkpointing: bool) -> str:
    """What lowers an audit's memory, with the current values."""
    parts = [f"lower width/height (now {width}x{height})"]
    if micro_batch > 1:
        parts.insert(0, f"lower micro_batch (now {micro_batch})")
    if mode == "paper" and not gradient_checkpointing:
        parts.append("turn gradient_checkpointing on (paper mode otherwise keeps every step's activations)")
    return ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else parts[0]


def grid_advice(top_n: int, width: int, height: int) -> str:
    """What lowers the Evidence Grid's memory, with the current values (it samples one image at a
    time, so top_n changes the time, not the memory)."""
    return f"lower width/height (now {width}x{height}); top_n (now {top_n}) changes only how long it takes"
