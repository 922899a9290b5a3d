"""ComfyUI glue: the node definitions and the extension that registers them."""
from comfy_api.latest import ComfyExtension, io

from .audit import DriftScopeAudit
from .evidence import DriftScopeEvidenceGrid
from .save_report import DriftScopeSaveReport

NODES = [DriftScopeAudit, DriftScopeEvidenceGrid, DriftScopeSaveReport]


class DriftScopeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
