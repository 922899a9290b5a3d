"""The pack's own socket type."""
from comfy_api.latest import io

DriftReportType = io.Custom("DRIFT_REPORT")
