"""Tier 3: hostile text sent to a live server (issue 12, "Hostile text"). Each input gets a clear
error that names it, within a bounded time, with the message quoting long text shortened, and
the server stays healthy: the next ordinary audit runs and reports the planted words.

The rules themselves (limits, escaping, shortening) are unit-tested in tests/core; here the
whole path counts: the editor's prompt, ComfyUI's executor, the node, the error the user sees."""
import json
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLANTED = {"tiger", "bicycle", "castle"}  # what the demo LoRA plants
SMALL_VOCAB = ["tiger", "bicycle", "castle", "apple", "river", "chair", "cloud", "horse", "lamp", "mountain"]

LONG_WORD = "x" * 10_000
HOSTILE = {
    "a 10,000-character word": (dict(custom_words="tiger\n" + LONG_WORD), "custom_words"),
    "a NUL byte": (dict(custom_words="tiger\nca\x00t"), "custom_words"),
    "an escape sequence": (dict(custom_words="tiger\n\x1b[31mred"), "custom_words"),
    "a right-to-left override": (dict(custom_words="tiger\nabc\u202edef"), "custom_words"),
    "a template without a slot": (dict(templates="a photo of a cat"), "template"),
    "a template with two slots": (dict(templates="a {} and a {}"), "template"),
    "a template longer than the encoder takes": (dict(templates="a photo of " * 60 + "a {}"), "template"),
}
BOUND_SECONDS = 60  # each refusal, on a loaded 2-core CPU (measured: a few seconds)


def _audit_only(demo_script, **inputs):
    """The LoRA example workflow on the demo models, without the evidence grid: a quick audit."""
    prompt = json.loads((REPO / "workflows" / "api" / "lora_side_effects.json").read_text(encoding="utf-8"))
    prompt = demo_script.demo_overrides(prompt, "lora_side_effects")
    prompt["10"]["inputs"].update(dict(vocabulary="custom", custom_words="\n".join(SMALL_VOCAB), preset="quick",
                                       width=32, height=32), **inputs)
    del prompt["11"], prompt["12"]  # the audit and its report only
    return prompt


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_text_gets_a_short_error_naming_the_input(demo_server, demo_script, comfy_server_module, case):
    inputs, named = HOSTILE[case]
    prompt = _audit_only(demo_script, **inputs)
    prompt["13"]["inputs"]["filename_prefix"] = f"t_hostile/{len(case)}"
    t = time.monotonic()
    with pytest.raises(comfy_server_module.PromptFailed) as err:
        demo_server.run(prompt, timeout=300)
    seconds = time.monotonic() - t
    message = err.value.exception_message or ""
    assert err.value.node_type == "DriftScopeAudit", err.value
    assert named in message, message
    assert len(message) < 600, f"{len(message)} characters: {message[:300]}"
    assert "\x00" not in message and "\x1b" not in message and "\u202e" not in message
    assert seconds < BOUND_SECONDS, f"{case}: {seconds:.1f}s"
    print(f"{case}: refused in {seconds:.1f}s, {len(message)} characters: {message.splitlines()[0][:160]}")


def test_emoji_words_are_handled_and_the_server_stays_healthy(demo_server, demo_script, comfy_server_module):
    """Emoji are ordinary text to CLIP's tokenizer: an audit with them runs, and after all the
    refused prompts above the server still runs an ordinary audit and finds the planted words."""
    prompt = _audit_only(demo_script, custom_words="\n".join(SMALL_VOCAB + ["🐯", "red 🚲"]), top_k=3, seed=5)
    prompt["13"]["inputs"]["filename_prefix"] = "t_hostile/emoji"
    entry = demo_server.run(prompt, timeout=600)
    text = comfy_server_module.outputs_of(entry, "13")["text"][0]
    report = json.loads((demo_server.output_directory / text.replace("saved ", "").split(" and ")[0]).read_text())
    assert {e["token"] for e in report["entries"][:3]} == PLANTED
    assert demo_server.get("/system_stats")["system"]["comfyui_version"]
