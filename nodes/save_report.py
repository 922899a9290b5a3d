"""DriftScope Save Report node: the report as JSON and CSV in ComfyUI's output folder."""
from __future__ import annotations

import os
import re

from comfy_api.latest import io, ui

import folder_paths

from ..driftscope_core.report import DriftReport
from ..driftscope_core.text import HIDDEN_CHARS, quoted
from . import compat
from .sockets import DriftReportType

# A file name is at most 255 bytes on the usual file systems; ComfyUI appends "_NNNNN_" and we
# append ".json"/".csv", so a name part of the prefix keeps room for 16 more bytes.
MAX_PART_BYTES = 255 - 16
MAX_PREFIX_CHARS = 1024
_DRIVE = re.compile(r"^[A-Za-z]:")
INSIDE = "give a prefix inside the output folder, such as driftscope/report"


class FilenamePrefixError(ValueError):
    """filename_prefix would not name a file inside the output folder."""


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath((folder, path)) == folder
    except ValueError:  # different drives on Windows
        return False


def checked_prefix(filename_prefix: str, out_dir: str) -> str:
    """The prefix as ComfyUI's path helper should see it: backslashes read as folder separators
    (as on Windows, so a prefix means the same on every system), and refused unless every file
    it names lies inside `out_dir` (symlinks resolved)."""
    text = filename_prefix if isinstance(filename_prefix, str) else str(filename_prefix)
    shown = quoted(text)
    if not text.strip():
        raise FilenamePrefixError(f"filename_prefix is empty; {INSIDE}")
    if len(text) > MAX_PREFIX_CHARS:
        raise FilenamePrefixError(f"filename_prefix {shown} is longer than {MAX_PREFIX_CHARS:,} characters; {INSIDE}")
    if HIDDEN_CHARS.search(text):
        raise FilenamePrefixError(f"filename_prefix {shown} holds control or formatting characters; {INSIDE}")
    prefix = text.replace("\\", "/")
    if prefix.startswith("/") or _DRIVE.match(prefix) or os.path.isabs(prefix):
        raise FilenamePrefixError(f"filename_prefix {shown} is an absolute path; {INSIDE}")
    name = os.path.basename(os.path.normpath(prefix))
    if name in ("", ".", ".."):
        raise FilenamePrefixError(f"filename_prefix {shown} names no file (it ends in a folder); {INSIDE}")
    folder = os.path.realpath(out_dir)
    target = os.path.realpath(os.path.join(folder, prefix))
    if not _inside(target, folder) or target == folder:
        raise FilenamePrefixError(f"filename_prefix {shown} leads outside the output folder; {INSIDE}")
    too_long = [p for p in prefix.split("/") if len(p.encode("utf-8")) > MAX_PART_BYTES]
    if too_long:
        raise FilenamePrefixError(f"filename_prefix {shown}: the name {quoted(too_long[0])} is longer than "
                                  f"{MAX_PART_BYTES} bytes, too long for a file name; use a shorter prefix")
    return prefix


def save_report(report: DriftReport, filename_prefix: str) -> list[str]:
    """Write <prefix>_NNNNN_.json and .csv with ComfyUI's own output-path helper; returns both
    paths. Every path is checked to lie inside the output folder before anything is written,
    and an existing file (or a link) at either name is never written through."""
    out_dir = folder_paths.get_output_directory()
    prefix = checked_prefix(filename_prefix, out_dir)
    try:
        folder, name, counter, _subfolder, _ = folder_paths.get_save_image_path(prefix, out_dir)
    except Exception as err:  # ComfyUI's own refusal, or the folder cannot be made
        raise FilenamePrefixError(f"filename_prefix {quoted(filename_prefix)}: {str(err).strip().splitlines()[0][:200]}; "
                                  f"{INSIDE}") from err
    base = os.path.join(folder, f"{name}_{counter:05}_")
    paths = [base + ".json", base + ".csv"]
    root = os.path.realpath(out_dir)
    for path in paths:
        if not _inside(os.path.realpath(path), root):
            raise FilenamePrefixError(f"filename_prefix {quoted(filename_prefix)} leads outside the output folder; "
                                      f"{INSIDE}")
    texts = (report.to_json(), report.to_csv())
    for path, text in zip(paths, texts):
        try:
            with open(path, "x", encoding="utf-8", newline="" if path.endswith(".csv") else None) as f:
                f.write(text)
        except OSError as err:
            raise FilenamePrefixError(f"filename_prefix {quoted(filename_prefix)}: cannot write "
                                      f"{quoted(os.path.relpath(path, out_dir))} in the output folder "
                                      f"({err.strerror or err}); {INSIDE}") from err
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
                                tooltip="File name prefix inside the output folder; a subfolder is allowed. "
                                        "Paths that would leave the output folder are refused."),
            ],
            outputs=[io.String.Output("json_path", tooltip="Where the JSON report was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, report, filename_prefix) -> io.NodeOutput:
        paths = save_report(report, filename_prefix)
        rel = [os.path.relpath(p, folder_paths.get_output_directory()) for p in paths]
        return io.NodeOutput(paths[0], ui=ui.PreviewText("saved " + " and ".join(rel)))
