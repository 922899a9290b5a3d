"""Issue 12 through the live server: files only inside the output folder, numbers at and past
their bounds.

One small audit (14 custom words, quick preset, 32 px, top_k 3) runs once on the shared demo
server; the Save Report prompts after it reuse ComfyUI's cached audit, so each costs well under
a second. About 1 minute in all on the 2-core CPU machine.
"""
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AUDIT, GRID, GRID_SAVE, REPORT = "10", "11", "12", "13"
WORDS = ["tiger", "bicycle", "castle", "apple", "river", "chair", "cloud", "horse", "lamp", "mountain",
         "bread", "guitar", "forest", "boat"]
SMALL = dict(vocabulary="custom", custom_words="\n".join(WORDS), preset="quick", width=32, height=32, top_k=3,
             seed=1201, micro_batch=8)
TOKEN = "ds12_" + uuid.uuid4().hex[:8]  # in every prefix, so a stray file can be found anywhere

pytestmark = pytest.mark.timeout(900)


def workflow(demo_script, *, report=True, grid=False, **audit):
    prompt = json.loads((REPO / "workflows" / "api" / "lora_side_effects.json").read_text())
    prompt = demo_script.demo_overrides(prompt, "lora_side_effects")
    prompt[AUDIT]["inputs"].update(SMALL, **audit)
    prompt[GRID]["inputs"].update(steps=2, top_n=1)
    prompt[GRID_SAVE]["inputs"]["filename_prefix"] = f"{TOKEN}/grid"
    prompt[REPORT]["inputs"]["filename_prefix"] = f"{TOKEN}/report"
    if not grid:
        del prompt[GRID], prompt[GRID_SAVE]
    if not report:
        del prompt[REPORT]
    return prompt


def files_under(folder: Path, skip=()) -> set[Path]:
    """Every file below `folder` (links not followed), except below the `skip` folders."""
    found = set()
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if Path(root, d) not in skip]
        found.update(Path(root, f) for f in files)
    return found


def top_entries(server) -> set[Path]:
    """The entries at the top of the base directory and its parent."""
    base = server.base_directory.resolve()
    return set(base.iterdir()) | set(base.parent.iterdir())


def stray_files(server, tops_before: set[Path]) -> list[Path]:
    """What a prefix could have made outside the output folder: anything named with TOKEN below
    the base directory's parent (this session's temporary folders, the output folder aside), a
    new entry at the top of the base directory or its parent (where "../" and "../../" lead),
    and anything named with TOKEN further up (folders other sessions share), in ComfyUI's folder
    (the server's working directory), its output folder and the system's temporary folder."""
    out = server.output_directory.resolve()
    base = server.base_directory.resolve()
    stray = [p for p in files_under(base.parent, skip={out, base / "models", base / "custom_nodes"})
             if TOKEN in str(p.relative_to(base.parent))]
    stray += sorted(top_entries(server) - tops_before)
    for folder in (base.parent.parent, base.parent.parent.parent, server.comfy_dir, server.comfy_dir / "output",
                   SYSTEM_TEMP):
        if folder.is_dir():
            stray += [p for p in folder.iterdir() if TOKEN in p.name]
    return stray


@pytest.fixture(scope="module")
def audited(demo_server, demo_script):
    """The module's one audit (its output stays in ComfyUI's cache for the later prompts)."""
    t = time.perf_counter()
    entry = demo_server.run(workflow(demo_script), timeout=600)
    print(f"audit for the file tests: {time.perf_counter() - t:.1f}s")
    return entry


# "x" at the end becomes TOKEN (and an absolute path into the temporary folder a name with
# TOKEN), so a stray file can be found
SYSTEM_TEMP = Path(tempfile.gettempdir())
ABSOLUTE = str(SYSTEM_TEMP / "x")
HOSTILE_PREFIXES = [
    "../x", "../../x", "../../../x", "sub/../../x", "..\\x", "sub\\..\\..\\x", "..", "../", ABSOLUTE, "/" + ABSOLUTE,
    "C:\\x", "", "   ", "x" * 300, "a/" * 600 + "x", "nul\x00x", "bell\x07x", "rtl\u202ex",
]


@pytest.mark.parametrize("prefix", HOSTILE_PREFIXES, ids=[ascii(p[:24]) for p in HOSTILE_PREFIXES])
def test_save_report_refuses_a_prefix_that_leaves_the_output_folder(audited, demo_server, demo_script,
                                                                     comfy_server_module, prefix):
    outside = prefix[:-1] + TOKEN if prefix.endswith("x") else prefix
    prompt = workflow(demo_script)
    prompt[REPORT]["inputs"]["filename_prefix"] = outside
    before = files_under(demo_server.output_directory)
    tops = top_entries(demo_server)
    t = time.perf_counter()
    with pytest.raises(comfy_server_module.PromptFailed) as failed:
        demo_server.run(prompt, timeout=120)
    assert time.perf_counter() - t < 30
    err = failed.value
    assert err.node_type == "DriftScopeSaveReport"
    assert err.exception_message.startswith("filename_prefix"), err.exception_message
    assert "output folder" in err.exception_message or "too long" in err.exception_message
    assert len(err.exception_message) < 400  # long prefixes are quoted shortened
    assert files_under(demo_server.output_directory) == before
    assert stray_files(demo_server, tops) == []


def test_save_report_refuses_a_link_out_of_the_output_folder(audited, demo_server, demo_script,
                                                             comfy_server_module, tmp_path):
    """A folder inside the output folder that is a symlink to somewhere else is not followed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = demo_server.output_directory / f"{TOKEN}_link"
    link.symlink_to(elsewhere, target_is_directory=True)
    prompt = workflow(demo_script)
    prompt[REPORT]["inputs"]["filename_prefix"] = f"{TOKEN}_link/report"
    with pytest.raises(comfy_server_module.PromptFailed) as failed:
        demo_server.run(prompt, timeout=120)
    assert "filename_prefix" in failed.value.exception_message
    assert "outside the output folder" in failed.value.exception_message
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("prefix, written", [
    ("sub/../kept", "kept"),  # stays inside: written where it leads
    ("deep/er/report", "deep/er/report"),
    ("y" * 200, "y" * 200),  # long but a valid file name
    ("win\\style", "win/style"),  # a backslash is a folder separator, as on Windows
    ("sub/", "sub"),  # as ComfyUI's SaveImage reads it: a file named sub_NNNNN_
])
def test_save_report_writes_a_prefix_inside_the_output_folder(audited, demo_server, demo_script,
                                                              comfy_server_module, prefix, written):
    prompt = workflow(demo_script)
    prompt[REPORT]["inputs"]["filename_prefix"] = f"{TOKEN}/{prefix}"
    tops = top_entries(demo_server)
    entry = demo_server.run(prompt, timeout=120)
    text = comfy_server_module.outputs_of(entry, REPORT)["text"][0]
    json_rel = text.replace("saved ", "").split(" and ")[0]
    path = (demo_server.output_directory / json_rel).resolve()
    assert path.is_file() and path.with_suffix(".csv").is_file()
    assert path.parent == (demo_server.output_directory / TOKEN / written).parent.resolve()
    assert path.name.startswith(Path(written).name + "_")
    assert json.loads(path.read_text())["entries"]
    assert stray_files(demo_server, tops) == []


def test_the_pack_writes_no_other_file(demo_server, demo_script, comfy_server_module, audited):
    """A whole workflow (audit, evidence grid through ComfyUI's SaveImage, report) adds files only
    in the output folder: nothing in the base directory's other folders, ComfyUI's folder or the
    pack. (The pack's code has one file write, in nodes/save_report.py; see also the scan below.)"""
    pack = REPO
    watched = [pack / "nodes", pack / "driftscope_core", pack / "web", pack / "workflows"]
    before_pack = set().union(*(files_under(d) for d in watched))
    base = demo_server.base_directory
    skip = {demo_server.output_directory, base / "models", base / "user"}
    before_base = files_under(base, skip=skip)
    tops = top_entries(demo_server)
    entry = demo_server.run(workflow(demo_script, grid=True, top_k=2), timeout=600)
    image = comfy_server_module.outputs_of(entry, GRID_SAVE)["images"][0]
    assert (demo_server.output_directory / image["subfolder"] / image["filename"]).is_file()
    new_pack = set().union(*(files_under(d) for d in watched)) - before_pack
    assert [p for p in new_pack if "__pycache__" not in p.parts] == []
    assert files_under(base, skip=skip) - before_base <= {base / "comfyui-server.log"}
    assert stray_files(demo_server, tops) == []


def test_only_save_report_writes_files():
    """The pack's code (nodes/, driftscope_core/, the root __init__.py) writes files in one
    module, nodes/save_report.py, whose paths the tests above try; the evidence grid's images go
    through ComfyUI's own SaveImage in the workflow."""
    import ast

    file_methods = {"write_text", "write_bytes", "save", "save_file", "makedirs", "mkdir", "symlink_to",
                    "hardlink_to", "touch", "copyfile", "copytree", "rmtree", "unlink", "rename"}
    module_calls = {("os", "remove"), ("os", "replace"), ("shutil", "copy"), ("shutil", "copy2"),
                    ("shutil", "move"), ("torch", "save"), ("np", "save"), ("numpy", "save")}
    writers = []
    for path in [REPO / "__init__.py", *sorted((REPO / "nodes").glob("*.py")),
                 *sorted((REPO / "driftscope_core").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id == "open":
                modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
                modes += [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
                if not modes or any(set(str(m)) & set("wax+") for m in modes):
                    writers.append(f"{path.relative_to(REPO).as_posix()}:{node.lineno} open")
            elif isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else None
                if func.attr in file_methods or (owner, func.attr) in module_calls:
                    writers.append(f"{path.relative_to(REPO).as_posix()}:{node.lineno} {func.attr}")
    assert writers and all(w.startswith("nodes/save_report.py:") for w in writers), writers


# -- numbers ----------------------------------------------------------------------------------
PAST_BOUNDS = [  # (node, input, value): refused by the server's prompt validation
    (AUDIT, "top_k", 0), (AUDIT, "top_k", 201), (AUDIT, "seed", -1), (AUDIT, "seed", 2**32),
    (AUDIT, "width", 0), (AUDIT, "width", 4104), (AUDIT, "height", 0), (AUDIT, "height", 4104),
    (AUDIT, "micro_batch", 0), (AUDIT, "micro_batch", 257), (AUDIT, "width", "wide"), (AUDIT, "seed", float("nan")),
    (GRID, "top_n", 0), (GRID, "top_n", 51), (GRID, "seed", -1), (GRID, "seed", 2**64), (GRID, "steps", 0),
    (GRID, "steps", 201), (GRID, "cfg", -0.1), (GRID, "cfg", 30.1), (GRID, "cfg", float("inf")),
    (GRID, "width", -8), (GRID, "width", 4104), (GRID, "height", -8), (GRID, "height", 4104),
]


@pytest.mark.parametrize("node, name, value", PAST_BOUNDS, ids=[f"{n}-{k}={v}" for n, k, v in PAST_BOUNDS])
def test_a_number_past_its_bounds_is_refused_with_its_name(demo_server, demo_script, comfy_server_module,
                                                           node, name, value):
    # the prompt holds only the branch of the node under test, so nothing valid is left to run
    prompt = workflow(demo_script, report=node == AUDIT, grid=node == GRID)
    prompt[node]["inputs"][name] = value
    with pytest.raises(comfy_server_module.PromptRejected) as rejected:
        demo_server.queue(prompt)
    err = rejected.value
    assert err.prompt_id is None  # nothing was queued
    errors = err.node_errors[node]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == [name]
    assert name in str(err)


@pytest.mark.parametrize("node, inputs, message", [
    (AUDIT, dict(width=36), "multiples of 8"),
    (GRID, dict(width=12), "multiples of 8"),
    (GRID, dict(cfg=float("nan")), "cfg"),  # NaN passes the server's min/max check
])
def test_a_number_the_schema_lets_through_is_refused_by_the_node(audited, demo_server, demo_script,
                                                                  comfy_server_module, node, inputs, message):
    prompt = workflow(demo_script, report=node == AUDIT, grid=node == GRID)
    prompt[node]["inputs"].update(inputs)
    with pytest.raises(comfy_server_module.PromptFailed) as failed:
        demo_server.run(prompt, timeout=300)
    assert failed.value.node_id == node
    assert message in failed.value.exception_message


def test_numbers_at_their_low_bounds_run(demo_server, demo_script, comfy_server_module):
    """top_k 1, width/height 8 (a 1x1 latent), micro_batch 1, the audit seed's highest value;
    the grid at top_n 1, steps 1, cfg 0, width/height 0 (the audit's 8) and its highest seed."""
    prompt = workflow(demo_script, grid=True, top_k=1, width=8, height=8, micro_batch=1, seed=2**32 - 1)
    prompt[GRID]["inputs"].update(top_n=1, steps=1, cfg=0.0, width=0, height=0, seed=2**64 - 1)
    t = time.perf_counter()
    entry = demo_server.run(prompt, timeout=900)  # a hang fails; the time itself is a benchmark's to judge
    print(f"low bounds: {time.perf_counter() - t:.1f}s")
    text = comfy_server_module.outputs_of(entry, REPORT)["text"][0]
    report = json.loads((demo_server.output_directory / text.replace("saved ", "").split(" and ")[0]).read_text())
    assert len(report["entries"]) == 1 and report["settings"]["width"] == 8
    assert report["settings"]["seed"] == 2**32 - 1
    assert comfy_server_module.outputs_of(entry, GRID_SAVE)["images"]


def test_counts_at_their_high_bounds_run(demo_server, demo_script, comfy_server_module):
    """top_k 200 and micro_batch 256 on a 14-word list: every word reported, in one run."""
    t = time.perf_counter()
    entry = demo_server.run(workflow(demo_script, top_k=200, micro_batch=256), timeout=600)
    print(f"top_k 200, micro_batch 256: {time.perf_counter() - t:.1f}s")
    text = comfy_server_module.outputs_of(entry, REPORT)["text"][0]
    report = json.loads((demo_server.output_directory / text.replace("saved ", "").split(" and ")[0]).read_text())
    assert sorted(e["token"] for e in report["entries"]) == sorted(WORDS)
