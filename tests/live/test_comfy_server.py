"""Live tests of scripts/comfy_server.py against a real ComfyUI server (no model files needed)."""

import os
import socket
import time
import uuid

import pytest

pytestmark = pytest.mark.timeout(600)


def _tiny_image_prompt(prefix, width=8, height=8):
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": height, "batch_size": 1, "color": 0x3366CC}},
        "2": {"class_type": "SaveImage",
              "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def test_server_answers_and_lists_stock_nodes(comfy_server):
    assert comfy_server.running
    assert comfy_server.url == f"http://127.0.0.1:{comfy_server.port}"
    stats = comfy_server.get("/system_stats")
    assert stats["system"]["comfyui_version"]

    info = comfy_server.object_info()
    for stock in ("KSampler", "CheckpointLoaderSimple", "EmptyImage", "SaveImage"):
        assert stock in info, f"stock node {stock} missing from /object_info"
    assert comfy_server.object_info("KSampler")["name"] == "KSampler"
    with pytest.raises(KeyError):
        comfy_server.object_info("NoSuchNodeClass")

    # --base-directory moves custom_nodes/: the harness links the packs installed next to
    # ComfyUI (DriftScope among them, via scripts/setup.sh) into the base directory, and
    # ComfyUI must have tried to load the pack from there.
    link = comfy_server.base_directory / "custom_nodes" / "DriftScope"
    assert link.is_symlink()
    assert os.path.join("custom_nodes", "DriftScope") in comfy_server.log_text()
    # Which DriftScope nodes exist is not asserted yet: the pack has no nodes so far.
    ours = [name for name, node in info.items()
            if str(node.get("python_module", "")).startswith("custom_nodes.DriftScope")]
    print(f"DriftScope nodes served: {len(ours)} {sorted(ours)[:10]}")

    comfy_server.interrupt()  # nothing running: must simply be accepted


def test_stock_prompt_saves_png_in_base_directory(comfy_server, comfy_server_module):
    prefix = f"harness_{uuid.uuid4().hex[:8]}"
    entry = comfy_server.run(_tiny_image_prompt(prefix), timeout=120)

    assert entry["status"]["status_str"] == "success"
    images = comfy_server_module.outputs_of(entry, "2")["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    png = comfy_server.base_directory / "output" / images[0]["subfolder"] / images[0]["filename"]
    assert png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert comfy_server.output_directory == comfy_server.base_directory / "output"
    # Nothing was written into the shared ComfyUI tree.
    assert not list((comfy_server.comfy_dir / "output").glob(prefix + "*"))


def test_invalid_input_is_rejected_with_its_name(comfy_server, comfy_server_module):
    prompt = _tiny_image_prompt("harness_invalid", height=-7)
    with pytest.raises(comfy_server_module.PromptRejected) as caught:
        comfy_server.queue(prompt)
    err = caught.value
    assert "height" in str(err)
    assert "1" in err.node_errors
    names = [e.get("extra_info", {}).get("input_name") for e in err.node_errors["1"]["errors"]]
    assert "height" in names


def test_execution_error_raises_prompt_failed(comfy_server, comfy_server_module):
    # EmptyImage is RGB: asking ImageToMask for the alpha channel fails while executing.
    prompt = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "alpha"}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    with pytest.raises(comfy_server_module.PromptFailed) as caught:
        comfy_server.run(prompt, timeout=120)
    err = caught.value
    assert err.node_id == "2"
    assert err.node_type == "ImageToMask"
    assert err.exception_message
    assert "ImageToMask" in str(err)


def test_load_api_workflow(tmp_path, comfy_server_module):
    api = tmp_path / "api.json"
    api.write_text('{"1": {"class_type": "EmptyImage", "inputs": {}}}')
    assert comfy_server_module.load_api_workflow(api)["1"]["class_type"] == "EmptyImage"
    ui = tmp_path / "ui.json"
    ui.write_text('{"nodes": [], "links": []}')
    with pytest.raises(ValueError, match="API"):
        comfy_server_module.load_api_workflow(ui)


def test_start_fails_fast_with_log_tail(comfy_dir, tmp_path, comfy_server_module):
    server = comfy_server_module.ComfyServer(
        comfy_dir, base_directory=tmp_path, extra_args=["--no-such-option"])
    t0 = time.monotonic()
    with pytest.raises(comfy_server_module.ComfyServerError) as caught:
        server.start()
    assert time.monotonic() - t0 < 60
    assert "--no-such-option" in str(caught.value)
    assert not server.running


def test_stop_leaves_no_process(comfy_server_factory, tmp_path):
    server = comfy_server_factory(tmp_path)
    print(f"ComfyUI start-up took {server.startup_seconds:.1f} s")
    pid, port = server.pid, server.port
    assert server.running

    server.stop()
    assert server.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing left in the server's process group
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    server.stop()  # idempotent
    assert "Starting server" in server.log_text()  # the log stays readable after stop()
