"""Cancel through a live ComfyUI (issue 12): an audit of a 20,000-word list shows progress as
soon as it starts, stops within seconds of the cancel button (POST /interrupt), and the next
audit gives the same report as it does without a cancel before it. Progress is read as the
browser reads it: the server's websocket ("progress" messages and the node's live text)."""
import asyncio
import json
import struct
import threading
import time

import aiohttp  # ComfyUI's own requirement, so every venv that runs ComfyUI has it
import pytest

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AUDIT = "10"
TEXT_EVENT = 3  # ComfyUI's binary websocket event for a node's progress text
SMALL = ["tiger", "bicycle", "castle", "apple", "river", "chair", "cloud", "horse", "lamp", "mountain"]
FIRST_PROGRESS_WITHIN = 5.0  # seconds after the node starts
STOP_WITHIN = 5.0  # seconds after the cancel


class Listener:
    """The websocket messages one client gets, each as (arrival time, type, data), in a thread."""

    def __init__(self, url: str, client_id: str):
        self.messages: list[tuple[float, str, dict]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._closing = None
        address = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._listen(address),), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the websocket did not connect"

    async def _listen(self, address: str) -> None:
        self._closing = asyncio.Event()
        async with aiohttp.ClientSession() as session, session.ws_connect(address) as ws:
            self._ready.set()
            reader = asyncio.ensure_future(self._read(ws))
            await self._closing.wait()
            reader.cancel()

    async def _read(self, ws) -> None:
        async for msg in ws:
            now = time.monotonic()
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                self.messages.append((now, data.get("type"), data.get("data") or {}))
            elif msg.type == aiohttp.WSMsgType.BINARY and struct.unpack(">I", msg.data[:4])[0] == TEXT_EVENT:
                n = struct.unpack(">I", msg.data[4:8])[0]
                node, text = msg.data[8 : 8 + n].decode(), msg.data[8 + n :].decode("utf-8", "replace")
                self.messages.append((now, "text", {"node": node, "text": text}))

    def wait_for(self, match, timeout: float, after: float = 0.0) -> tuple[float, dict]:
        """The first message since `after` for which match(type, data) is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, kind, data in list(self.messages):
                if t >= after and match(kind, data):
                    return t, data
            time.sleep(0.02)
        raise AssertionError(f"no such websocket message within {timeout:.0f} s; last: {self.messages[-5:]}")

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._closing.set)
        self._thread.join(10)


def clip_words(comfy_dir: Path, n: int) -> list[str]:
    """n distinct real words the CLIP tokenizer takes as one token each (its whole-word tokens)."""
    vocab = json.loads((comfy_dir / "comfy" / "sd1_tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    words = [p[:-4] for p, _ in sorted(vocab.items(), key=lambda item: item[1])
             if p.endswith("</w>") and p[:-4].isascii() and p[:-4].isalpha() and len(p) > 7]
    assert len(words) >= n
    return words[:n]


def audit_prompt(demo_script, prefix: str, **audit_inputs) -> dict:
    """The LoRA workflow with the demo models, audit and report only."""
    prompt = json.loads((REPO / "workflows" / "api" / "lora_side_effects.json").read_text())
    prompt = demo_script.demo_overrides(prompt, "lora_side_effects")
    del prompt["11"], prompt["12"]
    prompt[AUDIT]["inputs"].update(audit_inputs)
    prompt["13"]["inputs"]["filename_prefix"] = prefix
    return prompt


def report_of(server, harness, prompt) -> dict:
    entry = server.run(prompt, timeout=600)
    saved = harness.outputs_of(entry, "13")["text"][0].replace("saved ", "").split(" and ")[0]
    return json.loads((server.output_directory / saved).read_text())


def ranked(report):
    return [(e["token"], e["per_seed"], e["calibrated"]) for e in report["entries"]]


def test_a_20000_word_audit_shows_progress_at_once_and_cancels_within_seconds(demo_server, demo_script,
                                                                              comfy_server_module, comfy_dir):
    harness = comfy_server_module
    small = dict(vocabulary="custom", custom_words="\n".join(SMALL), mode="scan", top_k=3, seed=7)
    before = report_of(demo_server, harness, audit_prompt(demo_script, "t_cancel_live/before", **small))

    listener = Listener(demo_server.url, demo_server.client_id)
    try:
        big = audit_prompt(demo_script, "t_cancel_live/big", vocabulary="custom",
                           custom_words="\n".join(clip_words(comfy_dir, 20000)), seed=7)
        prompt_id = demo_server.queue(big)
        started, _ = listener.wait_for(lambda k, d: k == "executing" and d.get("node") == AUDIT
                                       and d.get("prompt_id") == prompt_id, timeout=120)
        ours = lambda k, d: k in ("progress", "text") and d.get("node") == AUDIT  # noqa: E731
        first, _ = listener.wait_for(ours, timeout=30, after=started)
        # progress moves: two different counts of the proxy's text encoding
        t1, d1 = listener.wait_for(lambda k, d: ours(k, d) and "proxy: encoding" in d.get("text", ""), 120, started)
        t2, d2 = listener.wait_for(lambda k, d: ours(k, d) and "proxy: encoding" in d.get("text", "")
                                   and d["text"] != d1["text"], timeout=30, after=t1)
        cancelled = time.monotonic()
        demo_server.interrupt()
        stopped, _ = listener.wait_for(lambda k, d: k == "execution_interrupted" and d.get("prompt_id") == prompt_id,
                                       timeout=120, after=cancelled)
        entry = demo_server.wait(prompt_id, timeout=60)
        shown = [(t, d) for t, k, d in listener.messages if ours(k, d) and started <= t <= cancelled]
    finally:
        listener.close()
    gaps = [b[0] - a[0] for a, b in zip(shown, shown[1:])]
    plan = next(d["text"] for _, d in shown if "model evaluations per model" in d.get("text", ""))
    print(f"20,000 words: first progress {first - started:.2f}s after the node started, proxy encoding shown "
          f"{t1 - started:.1f}s in ({d2['text']}), longest gap {max(gaps):.2f}s, stopped "
          f"{stopped - cancelled:.2f}s after the cancel; {plan}")
    assert first - started < FIRST_PROGRESS_WITHIN
    assert "20,000 words" in plan
    assert max(gaps) < 2 * STOP_WITHIN
    assert stopped - cancelled < STOP_WITHIN
    assert entry["status"]["status_str"] == "error"

    # the same small audit after the cancel: precision fp32 is what auto means on a CPU, and a
    # changed input makes ComfyUI run the audit again instead of answering from its cache
    after = report_of(demo_server, harness, audit_prompt(demo_script, "t_cancel_live/after", precision="fp32", **small))
    assert ranked(after) == ranked(before)
