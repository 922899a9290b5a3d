"""DriftScope Save Report node: the report as JSON and CSV in ComfyUI's output folder."""
from __future__ import annotations

import os

from comfy_api.latest import io, ui

import folder_paths

from ..driftscope_core.report import DriftReport
from . import compat
from .sockets import DriftReportType


def save_report(report: DriftReport, filename_prefix: str) -> list[str]:
    """Write <prefix>_NNNNN.json and .csv with ComfyUI's own output-path helper; returns both paths."""
    out_dir = folder_paths.get_output_directory()
    folder, name, counter, _subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    base = os.path.join(folder, f"{name}_{counter:05}_")
    paths = [base + ".json", base + ".csv"]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(report.to_json())
    with open(paths[1], "w", encoding="utf-8", newline="") as f:
        f.write(report.to_csv())
    return paths


class DriftScopeSaveReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return compat.schema(
            node_id="DriftScopeSaveReport",
            display_name="DriftScope Save Report",
            category="DriftScope",
            search_aliases=["save drift report", "lora audit report", "concept drift csv"],
            description="Saves the audit report as JSON (everything: entries, settings, seeds, model "
                        "identities, timings, evaluation counts) and CSV (the ranked table) in ComfyUI's output folder.",
            inputs=[
                DriftReportType.Input("report", tooltip="The report of a DriftScope Audit node."),
                io.String.Input("filename_prefix", default="driftscope/report",
                                tooltip="File name prefix inside the output folder; a subfolder is allowed."),
            ],
            outputs=[io.String.Output("json_path", tooltip="Where the JSON report was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, report, filename_prefix) -> io.NodeOutput:
        paths = save_report(report, filename_prefix)
        rel = [os.path.relpath(p, folder_paths.get_output_directory()) for p in paths]
        return io.NodeOutput(paths[0], ui=ui.PreviewText("saved " + " and ".join(rel)))
