"""DriftScope: which concepts did your LoRA or fine-tune break? A ComfyUI node pack."""
from .nodes import DriftScopeExtension

WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> DriftScopeExtension:
    return DriftScopeExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
