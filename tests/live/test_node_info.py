"""Tier 3: the pack's nodes as the running server describes them to the editor (/object_info):
the node schema is public API that saved workflows depend on."""
import pytest

NODES = ("DriftScopeAudit", "DriftScopeEvidenceGrid", "DriftScopeSaveReport")


@pytest.fixture(scope="module")
def info(comfy_server):
    everything = comfy_server.object_info()
    missing = [n for n in NODES if n not in everything]
    assert not missing, f"the server did not load: {missing}\n{comfy_server.log_text()[-3000:]}"
    return everything


def _inputs(node):
    spec = node["input"]
    return {**spec.get("required", {}), **spec.get("optional", {})}


@pytest.mark.parametrize("name", NODES)
def test_every_node_and_input_has_help_text(info, name):
    node = info[name]
    assert node["category"] == "DriftScope" and len(node["description"]) > 40
    for input_name, spec in _inputs(node).items():
        options = spec[1] if len(spec) > 1 else {}
        assert len(options.get("tooltip", "")) > 10, f"{name}.{input_name} has no tooltip"


@pytest.mark.parametrize("name", NODES)
def test_search_aliases_where_the_server_offers_them(info, name):
    """ComfyUI 0.33 serves `search_aliases` for every node; 0.3.75 has no such field."""
    if "search_aliases" not in info["KSampler"]:
        pytest.skip("this ComfyUI serves no search aliases")
    aliases = info[name]["search_aliases"]
    assert aliases and all(isinstance(a, str) and a == a.lower() for a in aliases)
    if name == "DriftScopeAudit":
        assert {"lora audit", "concept drift"} <= set(aliases)


def test_seeds_are_fixed_unless_the_user_says_otherwise(info):
    """An input named `seed` gets a randomize control unless the schema says otherwise: a
    re-queued workflow must reproduce its report and its evidence. The Audit has no control
    widget; the Evidence Grid keeps its control widget (saved workflows store its value among the
    others, by position), set to "fixed" where ComfyUI can say so (0.33; 0.3.75 only knows True)."""
    assert _inputs(info["DriftScopeAudit"])["seed"][1].get("control_after_generate") is False
    grid = _inputs(info["DriftScopeEvidenceGrid"])["seed"][1].get("control_after_generate")
    assert grid in ("fixed", True), grid


def test_audit_table_is_resent_after_reload_where_the_server_supports_it(info):
    """0.33 resends a node's UI output after a page reload when the node says it has an
    intermediate output (the Audit's table); 0.3.75 has no such flag (the frontend keeps it)."""
    if "has_intermediate_output" not in info["KSampler"]:
        pytest.skip("this ComfyUI has no has_intermediate_output")
    assert info["DriftScopeAudit"]["has_intermediate_output"] is True
    assert info["DriftScopeSaveReport"]["output_node"] is True
