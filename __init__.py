"""DriftScope: which concepts did your LoRA or fine-tune break? A ComfyUI node pack.

ComfyUI finds `comfy_entrypoint` and `WEB_DIRECTORY` here. The nodes are imported only when
ComfyUI asks for them, so importing this package has no side effects.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import DriftScopeExtension

    return DriftScopeExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
