"""Issue 12 through one live server of this module's own: memory over ten audits, audits queued
back to back, an image workflow beside an audit, and the audit's largest size.

The server runs under an address-space limit (ulimit -v, ADDRESS_SPACE_GB) so that a run that
asks for far more memory than the machine has fails inside the server instead of drawing the
kernel's OOM killer onto the machine; the test of the largest size also watches the server's
resident memory and kills the server past WATCHDOG_GB. Cost on the 2-core CPU machine: about
3 to 4 minutes (ten 32 px quick audits of 12 words, two repeats, one image, the size check).
"""
import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
AUDIT, REPORT = "10", "13"
WORDS = ["tiger", "bicycle", "castle", "apple", "river", "chair", "cloud", "horse", "lamp", "mountain",
         "bread", "guitar"]
SMALL = dict(vocabulary="custom", custom_words="\n".join(WORDS), preset="quick", width=32, height=32, top_k=3,
             micro_batch=8)
TOKEN = uuid.uuid4().hex[:8]
ADDRESS_SPACE_GB = 12  # the server's virtual memory; it uses about 5 GB of it
WATCHDOG_GB = 4.0  # resident memory past which the largest-size test kills the server
RUNS = 10
# Resident memory after run 10 may exceed that after run 2 by at most this much (measured
# figures in test_ten_audits_keep_resident_memory_bounded). A leak of one copy of the demo's
# text encoder per run (235 MB) would pass it after four runs (1,880 MB over runs 3-10).
RSS_GROWTH_BOUND_MB = 800

pytestmark = pytest.mark.timeout(1200)


def audit_prompt(demo_script, seed, prefix, audit_id=AUDIT, **audit):
    prompt = json.loads((REPO / "workflows" / "api" / "lora_side_effects.json").read_text())
    prompt = demo_script.demo_overrides(prompt, "lora_side_effects")
    prompt[AUDIT]["inputs"].update(SMALL, seed=seed, **audit)
    prompt[REPORT]["inputs"]["filename_prefix"] = f"{TOKEN}/{prefix}"
    del prompt["11"], prompt["12"]  # the audit and its report
    if audit_id != AUDIT:  # another node id: ComfyUI's cache keys the audit by it (hidden unique_id)
        prompt[audit_id] = prompt.pop(AUDIT)
        prompt[REPORT]["inputs"]["report"] = [audit_id, 0]
    return prompt


def image_prompt(prefix, zero_loras=0):
    """An ordinary text-to-image workflow of stock nodes on the demo checkpoint (node "1", as in the
    audit workflow, so ComfyUI hands both the same cached MODEL and CLIP). Through `zero_loras`
    LoraLoaders at strength 0, which return their inputs as they are, the same image gets
    another cache key, so ComfyUI computes it again."""
    src = f"{89 + zero_loras}" if zero_loras else "1"
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "driftscope_demo_base.safetensors"}},
        "101": {"class_type": "CLIPTextEncode", "inputs": {"clip": [src, 1], "text": "a photo of a tiger"}},
        "102": {"class_type": "CLIPTextEncode", "inputs": {"clip": [src, 1], "text": ""}},
        "103": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "104": {"class_type": "KSampler", "inputs": {
            "model": [src, 0], "positive": ["101", 0], "negative": ["102", 0], "latent_image": ["103", 0],
            "seed": 1234, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "105": {"class_type": "VAEDecode", "inputs": {"samples": ["104", 0], "vae": ["1", 2]}},
        "106": {"class_type": "SaveImage", "inputs": {"images": ["105", 0], "filename_prefix": f"{TOKEN}/{prefix}"}},
    }
    for i in range(zero_loras):
        before = "1" if i == 0 else f"{89 + i}"
        prompt[f"{90 + i}"] = {"class_type": "LoraLoader", "inputs": {
            "model": [before, 0], "clip": [before, 1], "lora_name": "driftscope_demo_planted.safetensors",
            "strength_model": 0.0, "strength_clip": 0.0}}
    return prompt


def pixels(server, harness, entry, node="106"):
    image = harness.outputs_of(entry, node)["images"][0]
    with Image.open(server.output_directory / image["subfolder"] / image["filename"]) as png:
        return np.asarray(png.convert("RGB")).copy()


def saved_report(server, harness, entry):
    text = harness.outputs_of(entry, REPORT)["text"][0]
    return json.loads((server.output_directory / text.replace("saved ", "").split(" and ")[0]).read_text())


def rss_mb(server) -> float:
    return psutil.Process(server.pid).memory_info().rss / 2**20


def was_run(entry, node_id) -> bool:
    """True unless ComfyUI took the node's output from its cache."""
    cached = [data.get("nodes", []) for event, data in entry["status"]["messages"] if event == "execution_cached"]
    return all(node_id not in nodes for nodes in cached)


@pytest.fixture(scope="module")
def server(comfy_dir, demo_models_dir, tmp_path_factory, comfy_server_module):
    """This module's server (address space limited); its first prompt is the image alone."""
    base = tmp_path_factory.mktemp("comfy-memory")
    (base / "models").symlink_to(demo_models_dir, target_is_directory=True)
    limited = base / "python-limited"
    limited.write_text(f'#!/bin/sh\nulimit -v {ADDRESS_SPACE_GB * 2**20}\nexec "{comfy_server_module.sys.executable}" "$@"\n')
    limited.chmod(0o755)
    with comfy_server_module.ComfyServer(comfy_dir, python=limited, base_directory=base) as srv:
        srv.image_alone = pixels(srv, comfy_server_module, srv.run(image_prompt("alone", zero_loras=1)))
        yield srv


@pytest.fixture(scope="module")
def ten_runs(server, demo_script, comfy_server_module):
    """Ten audits in a row, one at a time, seeds 1..10: reports and resident memory after each."""
    reports, rss, seconds = [], [], []
    for seed in range(1, RUNS + 1):
        t = time.perf_counter()
        entry = server.run(audit_prompt(demo_script, seed, f"run{seed}"), timeout=600)
        seconds.append(time.perf_counter() - t)
        assert was_run(entry, AUDIT)
        reports.append(saved_report(server, comfy_server_module, entry))
        rss.append(rss_mb(server))
    print("audit seconds:", [round(s, 1) for s in seconds], "RSS MB:", [round(r) for r in rss])
    return reports, rss


def test_ten_audits_keep_resident_memory_bounded(ten_runs):
    """Resident memory of the server after run 10 stays within RSS_GROWTH_BOUND_MB of run 2.

    Measured on the 2-core CPU machine, 2026-12 (12 words, quick, 32 px, this module's server):
    ComfyUI 0.33.0: 1,719 MB after run 2, 1,722 MB after run 10 (+4 MB; runs 1-10 within
    1,719-1,722); after the text-encoder batching of 06d624a/b362007: 2,023 and 2,018 MB (-5 MB,
    runs within 1,708-2,122). ComfyUI 0.3.75: 1,645 MB after run 2, 1,648 MB after run 10 (+3 MB); in one
    earlier run 1,433 and 1,681 MB (+248 MB), but without a trend: RSS swung between 1,261 and
    1,681 MB from one run to the next (run 3: 1,263, run 6: 1,264), and 30 runs on a server
    without the address-space limit stayed within 1,647-1,670 MB. A fresh-clone run on 0.3.75
    (2026-12-01) stayed within 1,960-1,984 MB for runs 1-8, then stepped once to 2,403 MB at
    run 9 and stayed there (+442 MB: a one-off step of the allocator, not a trend). Hence the
    bound of 800 MB: above that noise, below a leak of 100 MB a run.
    """
    _, rss = ten_runs
    growth = rss[RUNS - 1] - rss[1]
    print(f"RSS after run 2: {rss[1]:.0f} MB, after run {RUNS}: {rss[RUNS - 1]:.0f} MB, growth {growth:+.0f} MB")
    assert growth <= RSS_GROWTH_BOUND_MB, f"RSS grew {growth:.0f} MB from run 2 to run {RUNS}: {rss}"


def test_audits_queued_back_to_back_differ_by_seed_and_reproduce(server, ten_runs, demo_script,
                                                                 comfy_server_module):
    """Seeds 2 and 3 again, queued together under another node id (so ComfyUI's cache cannot
    answer), then an ordinary image workflow queued right behind them: each audit repeats its
    earlier report to the last digit, the two differ in their noise, and the image is
    bit-identical to the one the server made alone before any audit."""
    harness = comfy_server_module
    first, _ = ten_runs
    ids = [server.queue(audit_prompt(demo_script, seed, f"again{seed}", audit_id="20")) for seed in (2, 3)]
    image_id = server.queue(image_prompt("beside"))
    entries = [server.wait(i, timeout=600) for i in (*ids, image_id)]
    assert all(e["status"]["status_str"] == "success" for e in entries), [e["status"] for e in entries]
    assert was_run(entries[0], "20") and was_run(entries[1], "20") and was_run(entries[2], "104")
    again = [saved_report(server, harness, e) for e in entries[:2]]

    def noise(report):
        return report["seeds"], [(e["token"], e["per_seed"], e["search_drift"]) for e in report["entries"]]

    assert noise(again[0]) == noise(first[1])  # seed 2, first run 2
    assert noise(again[1]) == noise(first[2])  # seed 3, first run 3
    assert again[0]["seeds"]["rescore"] != again[1]["seeds"]["rescore"]
    assert again[0]["seeds"]["search"] != again[1]["seeds"]["search"]
    per_seed = [{e["token"]: e["per_seed"] for e in r["entries"]} for r in again]
    shared = set(per_seed[0]) & set(per_seed[1])
    assert shared and all(per_seed[0][w] != per_seed[1][w] for w in shared)
    assert np.array_equal(pixels(server, harness, entries[2]), server.image_alone)


def test_an_image_workflow_beside_an_audit_is_bit_identical(server, demo_script, comfy_server_module):
    """The audit and the image in one prompt, sharing the checkpoint loader's MODEL and CLIP."""
    harness = comfy_server_module
    prompt = audit_prompt(demo_script, 11, "together", audit_id="30")
    both = image_prompt("together", zero_loras=2)
    both.update(prompt)
    entry = server.run(both, timeout=600)
    assert was_run(entry, "30") and was_run(entry, "104")
    assert np.array_equal(pixels(server, harness, entry), server.image_alone)


class Watchdog(threading.Thread):
    """Kills the server if its resident memory passes a limit; records the peak."""

    def __init__(self, server, limit_gb):
        super().__init__(daemon=True)
        self.server, self.limit, self.peak, self.killed, self.done = server, limit_gb * 2**30, 0, False, False

    def run(self):
        proc = psutil.Process(self.server.pid)
        while not self.done:
            try:
                rss = proc.memory_info().rss
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                self.killed = True
                proc.kill()
                return
            time.sleep(0.02)


def test_the_largest_audit_size_is_refused_or_cancelled_and_the_server_stays_healthy(
        server, demo_script, comfy_server_module):
    """width/height 4096 on the CPU: a clear error naming width/height within 60 s, or a cancel
    that stops it within 15 s; either way the next prompt runs."""
    dog = Watchdog(server, WATCHDOG_GB)
    dog.start()
    try:
        t = time.perf_counter()
        prompt_id = server.queue(audit_prompt(demo_script, 12, "huge", width=4096, height=4096))
        try:
            entry = server.wait(prompt_id, timeout=60)
        except comfy_server_module.ComfyTimeout:
            server.interrupt()
            t = time.perf_counter()
            entry = server.wait(prompt_id, timeout=15)
            assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
        else:
            errors = [d for event, d in entry["status"]["messages"] if event == "execution_error"]
            assert entry["status"]["status_str"] == "error" and errors
            message = errors[0]["exception_message"]
            print(f"4096 audit refused in {time.perf_counter() - t:.1f}s: {message[:300]}")
            assert "width" in message and "height" in message, message
    finally:
        dog.done = True
        dog.join()
        print(f"peak resident memory {dog.peak / 2**30:.2f} GB, killed: {dog.killed}")
    assert not dog.killed
    assert server.run(image_prompt("after_huge", zero_loras=3), timeout=300)["status"]["status_str"] == "success"
