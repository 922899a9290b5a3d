"""DriftScope Audit node: base and adapted MODEL/CLIP in, ranked drifted words out."""
from __future__ import annotations

from dataclasses import replace

import torch
from comfy_api.latest import io, ui

import comfy.samplers

from ..driftscope_core.audit import MAX_EVALUATIONS, planned_cost, run_audit, words_that_fit
from ..driftscope_core.conditioning import shortest_layout
from ..driftscope_core.models import Runtime
from ..driftscope_core.objective import OBJECTIVES
from ..driftscope_core.prompts import TemplateError, parse_templates, tokenize_template, tokenize_template_per_encoder
from ..driftscope_core.text import quoted
from ..driftscope_core.settings import DIRECTIONS, MODES, PRESETS, AuditSettings, settings_from_preset
from ..driftscope_core.vocabulary import MAX_WORDS, build_vocabulary
from . import compat, errors, host
from .progress import node_progress, send_text
from .sockets import DriftReportType

VOCABULARIES = ("cifar100", "cifar10", "coco80", "imagenet1k", "clip_words", "custom")


def audit_models(base_model, base_clip, adapted_model, adapted_clip, *, vocabulary, custom_words, templates,
                 preset, mode, scheduler, precision, micro_batch, gradient_checkpointing, node_id=None, cfg=0.0,
                 guidance=-1.0, **settings):
    """Everything the node does, callable without a node: check inputs, refuse an audit too large
    to run (check_cost), build the core's view of both models, run the audit under gradients,
    return the report. Progress (and a cancel point) from the first word on. `cfg` 0 and
    `guidance` -1 take the family's defaults (Flux: CFG 1, dev's distilled guidance 3.5)."""
    progress = node_progress(node_id, "DriftScope")
    family = host.check_pair(base_model, adapted_model, base_clip, adapted_clip)
    overrides = dict(settings, **({} if mode == "preset" else {"mode": mode}), **_guidance(family, base_model, cfg, guidance))
    audit_settings = _family_steps(family, settings_from_preset(preset, **overrides), "kept_steps" in settings)
    if vocabulary == "clip_words" and not family.clip_words:
        raise host.InputError(f"vocabulary: clip_words lists CLIP's whole-word tokens, and {family.name} reads T5 only; "
                              "choose a built-in list (cifar100, imagenet1k, ...) or custom")
    tokenize, bpe, reserved = host.tokenizer_functions(base_clip, family)
    progress({"stage": "vocabulary", "note": "reading the word list"})
    vocab = build_vocabulary(vocabulary, _reporting(tokenize, progress), bpe, custom_words, reserved_ids=reserved)
    vocab = family_vocabulary(vocab, base_clip, family)
    template_texts = parse_templates(templates)
    runtime = host.runtime_for(precision, micro_batch, gradient_checkpointing)
    host.check_cpu_resolution(audit_settings.width, audit_settings.height, runtime)
    host.check_memory(base_model, audit_settings.width, audit_settings.height, runtime)
    plan = check_cost(audit_settings, len(vocab), len(template_texts), host.same_text_encoder(base_clip, adapted_clip),
                      runtime, vocabulary)
    progress({"stage": "plan", "note": plan})
    with torch.inference_mode(False), torch.enable_grad():
        progress({"stage": "prepare", "note": "preparing the text encoders"})
        base, adapted, *placebo = host.model_sides(
            family, base_model, base_clip, adapted_model, adapted_clip, runtime, need_grad=audit_settings.mode == "paper",
            guidance=audit_settings.guidance, placebo=audit_settings.placebo,
            placebo_seed=audit_settings.derived_seeds("placebo", 1)[0])
        try:
            tpls = family_templates(template_texts, base_clip, family, base.text, vocab)
            schedule = host.schedule_of(base_model, scheduler, audit_settings.schedule_steps)
            return run_audit(
                base, adapted, vocab, tpls, schedule, audit_settings, runtime,
                latent_channels=base_model.model.latent_format.latent_channels,
                models={"family": family.name, "base": host.identity(base_model, base_clip, family),
                        "adapted": host.identity(adapted_model, adapted_clip, family)},
                callback=progress,
                placebo=placebo[0] if placebo else None,
            )
        finally:  # finished, failed or cancelled
            host.release(base, adapted, *placebo)


def _family_steps(family, settings: AuditSettings, chosen: bool) -> AuditSettings:
    """The family's kept steps in the default modes (screen, scan): the preset's times
    `family.kept_steps_factor`, at most the schedule; paper mode keeps the paper's, and a
    kept_steps the caller chose stays."""
    if chosen or settings.mode == "paper" or family.kept_steps_factor == 1:
        return settings
    return replace(settings, kept_steps=min(settings.kept_steps * family.kept_steps_factor, settings.schedule_steps))


def _guidance(family, model, cfg: float, guidance: float) -> dict:
    """Settings overrides for the CFG scale and the distilled guidance: the node's values where
    given (cfg > 0, guidance >= 0), else the family's (sampling_defaults), else the preset's."""
    defaults = family.sampling_defaults(model)
    out = {}
    if cfg > 0:
        out["cfg"] = float(cfg)
    elif defaults["cfg"] is not None:
        out["cfg"] = defaults["cfg"]
    if defaults["guidance"] is not None:
        out["guidance"] = float(guidance) if guidance >= 0 else defaults["guidance"]
    return out


def family_vocabulary(vocab, clip, family):
    """The candidates with their ids in every text encoder that has its own tokenizer (Flux's
    T5): candidates are words in every tokenizer the family uses."""
    for name, (tok, _, reserved) in host.encoder_tokenizers(clip, family).items():
        vocab = vocab.with_encoder_ids(name, tok, reserved, tokenizer_name=name.upper())
    return vocab


def family_templates(texts, clip, family, text_side, vocab) -> list:
    """Method step 1's templates, tokenized by the vocabulary's tokenizer and by every encoder
    with its own (each must leave room for the longest word in its tokens)."""
    tokenize = host.template_tokenizer(clip, family)
    layout = shortest_layout(text_side)
    others = host.encoder_tokenizers(clip, family)
    if family.word_prefix:
        for text in texts:
            before = text.split("{}")[0]
            if not before.endswith(family.word_prefix):
                raise TemplateError(f"templates: template {quoted(text)}: {family.name}'s tokenizer reads a word after a space "
                                    "differently from one at the start or after punctuation, and the candidates are "
                                    "encoded as words after a space; put the slot after a space, e.g. \"a photo of a {}\"")
    if not others:
        return [tokenize_template(t, tokenize, layout, word_tokens=vocab.max_tokens) for t in texts]
    encoders = {family.vocabulary_encoder: (tokenize, text_side.layouts[family.vocabulary_encoder], vocab.max_tokens),
                **{name: (tok, lay, vocab.max_tokens_for(name)) for name, (tok, lay, _) in others.items()}}
    return [tokenize_template_per_encoder(t, encoders) for t in texts]


def _reporting(tokenize, progress, every: int = 1000):
    """`tokenize` with a progress event (and so a cancel point) every `every` words."""
    calls = 0

    def counted(text: str) -> list[int]:
        nonlocal calls
        calls += 1
        if calls % every == 0:
            progress({"stage": "vocabulary", "note": f"tokenizing {calls:,} words"})
        return tokenize(text)

    return counted


def check_cost(settings: AuditSettings, words: int, templates: int, shared_text: bool, runtime: Runtime,
               vocabulary: str) -> str:
    """The audit's plan in one line, or an InputError naming the word list when it would need more
    than MAX_EVALUATIONS model evaluations per model, with what would fit instead."""
    gradient_checkpointing = runtime.gradient_checkpointing
    cost = planned_cost(settings, words, templates, shared_text, gradient_checkpointing)
    side = cost.busier_side
    plan = (f"{words:,} words x {templates} template{'s' * (templates > 1)}, {settings.mode} mode: at most "
            f"{cost.per_model:,} model evaluations per model ({cost.of(side, 'text_forward'):,} text-encoder passes, "
            f"{cost.of(side, 'unet_forward'):,} UNet evaluations)")
    if cost.per_model <= MAX_EVALUATIONS:
        return plan
    where = "custom_words" if vocabulary == "custom" else f"vocabulary '{vocabulary}'"
    fits = words_that_fit(settings, templates, shared_text, gradient_checkpointing, most=MAX_WORDS)
    remedies = [f"a shorter list (at most {fits:,} words fit {settings.mode} mode with these settings)" if fits
                else "a smaller preset"]
    if settings.mode != "screen":
        screen = planned_cost(replace(settings, mode="screen"), words, templates, shared_text)
        if screen.per_model <= MAX_EVALUATIONS:
            remedies.append(f"mode screen (about {screen.per_model:,} per model for this list; it recalled as much "
                            "as scan in the benchmark)")
    if templates > 1:
        remedies.append("fewer templates")
    on_cpu = (" On a CPU even an audit within the limit takes hours for a list this long: a GPU is the place "
              "for it." if runtime.device.type == "cpu" else "")
    raise host.InputError(f"{where}: {plan}, more than the {MAX_EVALUATIONS:,} an audit takes. "
                          f"Use {', or '.join(remedies)}.{on_cpu}")


class DriftScopeAudit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return compat.schema(
            node_id="DriftScopeAudit",
            display_name="DriftScope Audit",
            category="DriftScope",
            search_aliases=["lora audit", "concept drift", "lora side effects", "model diff", "drift scope"],
            has_intermediate_output=True,  # its UI output is kept with the cached result (0.33); the page reload is the frontend's (web/js)
            description="Finds the words whose visual concept an adaptation (LoRA, fine-tune, concept "
                        "erasure) changed most: compares the base and adapted models' attention to each word "
                        "(cross-attention in UNets, joint attention in the DiTs) on the same noise, re-scores the top words on shared seeds and calibrates "
                        "them against random words, each adjusted for how much a random placebo change moves it. Supports SD1.x, SD2.x, SDXL (with Pony, Illustrious, NoobAI), "
                        "Flux.1 dev/schnell, Chroma, Qwen-Image, Z-Image and SD3/SD3.5 models; other families get an error that names them. The input models are not modified.",
            inputs=[
                io.Model.Input("base_model", tooltip="The model before adaptation (e.g. from Load Checkpoint)."),
                io.Clip.Input("base_clip", tooltip="The base model's CLIP."),
                io.Model.Input("adapted_model", tooltip="The adapted model (e.g. from LoraLoader or a second Load Checkpoint)."),
                io.Clip.Input("adapted_clip", tooltip="The adapted model's CLIP (LoraLoader's CLIP output; the base CLIP if the adaptation left the text encoder alone)."),
                io.Combo.Input("vocabulary", options=list(VOCABULARIES), default="cifar100",
                               tooltip="Candidate words: a built-in concept list, every whole-word CLIP token (clip_words, 32,031 words), "
                                       "or your own list (custom). The cost grows with the list: clip_words in screen mode takes about "
                                       "32,000 text-encoder passes and 35,000 UNet evaluations per model (about 2.4 hours on a 2-core "
                                       "CPU even with tiny demo models at 64 px: a GPU is the place for it); scan mode would take "
                                       f"over a million. An audit past {MAX_EVALUATIONS:,} model evaluations per model is refused "
                                       "before it starts, with its cost and what would fit."),
                io.String.Input("custom_words", multiline=True, default="",
                                tooltip="With vocabulary 'custom': your words, one per line or comma-separated. Words of several tokens are kept whole. "
                                        "The node shows the audit's cost before it starts (see vocabulary)."),
                io.String.Input("templates", multiline=True, default="a photo of a {}",
                                tooltip="Prompt templates, one per line, each with exactly one {} where the word goes. Drift is averaged over templates; each one adds the cost of a whole audit."),
                io.Combo.Input("preset", options=list(PRESETS), default="standard",
                               tooltip="Search budget: quick (a first look), standard, paper (the paper's numbers: 4 of 50 steps, CFG 7.5, batch 4, 100 AdamW steps). On SDXL, screen and scan keep twice the preset's steps (standard: 8 of 50)."),
                io.Combo.Input("mode", options=["preset", *MODES], default="preset",
                               tooltip="screen (default): a cheap first-step proxy for every word, then the finalists in full; scan: every word in full; paper: the paper's soft-prompt gradient search; preset: the preset's mode."),
                io.Combo.Input("direction", options=list(DIRECTIONS), default="most",
                               tooltip="most: the most drifted words; least: the words the adaptation left most intact."),
                io.Combo.Input("objective", options=list(OBJECTIVES), default="attention",
                               tooltip="attention: L1 between the slot word's attention maps (the paper's cross-attention; joint attention in the DiTs); prediction: x0-prediction delta; latent: latent delta after the kept steps."),
                io.Int.Input("top_k", default=10, min=1, max=200, tooltip="How many words to report."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the noise and the search; the same seed gives the same report."),
                io.Int.Input("width", default=512, min=8, max=4096, step=8, tooltip="Image width the audit simulates (a multiple of 8). 512 for SD1.x, SD2.x and SDXL alike "
                                     "(SDXL's native 1024 costs 4x; README, 'Measured'). On a CPU at most 1024x1024 pixels in all; "
                                     "anything that cannot fit in memory is refused before the audit starts."),
                io.Int.Input("height", default=512, min=8, max=4096, step=8, tooltip="Image height the audit simulates (a multiple of 8). On a CPU at most 1024x1024 pixels in all; "
                                     "anything that cannot fit in memory is refused before the audit starts."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="normal",
                               tooltip="Sigma schedule of the truncated denoising."),
                io.Combo.Input("precision", options=["auto", "fp32", "bf16", "fp16"], default="auto", optional=True,
                               tooltip="Model passes on CUDA run under autocast (auto: bf16 where supported, else fp16). The soft prompt always stays fp32. CPU always runs fp32."),
                io.Int.Input("micro_batch", default=4, min=1, max=256, optional=True,
                             tooltip="Latents per model call; lower it to save memory (a guided call runs twice as many)."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute model activations in the backward pass (paper mode): much less memory, about 30% slower."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1, optional=True,
                               tooltip="CFG scale of the audit's denoising; 0 follows the model family as users sample it: "
                                       "the preset's 7.5 for SD1.x, SD2.x and SDXL, 1.0 for Flux dev and schnell "
                                       "(one model evaluation per step), 4.0 for Chroma, 2.5 for Qwen-Image, 1.0 for Z-Image (Turbo), 4.5 for SD3.5."),
                io.Float.Input("guidance", default=-1.0, min=-1.0, max=100.0, step=0.1, optional=True,
                               tooltip="Distilled guidance for families that take it (Flux dev, as FluxGuidance sets it); "
                                       "-1 uses the family's default (3.5 for Flux dev). Other families ignore it."),
            ],
            outputs=[
                DriftReportType.Output("report", tooltip="The full audit report, for the Evidence Grid and Save Report nodes."),
                io.String.Output("table", tooltip="The ranked words as a text table."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, base_model, base_clip, adapted_model, adapted_clip, vocabulary, custom_words, templates, preset,
                mode, direction, objective, top_k, seed, width, height, scheduler, precision="auto", micro_batch=4,
                gradient_checkpointing=False, cfg=0.0, guidance=-1.0) -> io.NodeOutput:
        advice = errors.audit_advice(micro_batch, width, height, mode, gradient_checkpointing)
        with errors.out_of_memory_advice("DriftScope Audit", advice):
            report = audit_models(
                base_model, base_clip, adapted_model, adapted_clip, vocabulary=vocabulary, custom_words=custom_words,
                templates=templates, preset=preset, mode=mode, scheduler=scheduler, precision=precision,
                micro_batch=micro_batch, gradient_checkpointing=gradient_checkpointing, node_id=cls.hidden.unique_id,
                cfg=cfg, guidance=guidance,
                direction=direction, objective=objective, top_k=top_k, seed=seed, width=width, height=height,
            )
        table = report.table()
        flagged = sum(e.significant for e in report.entries)
        send_text(f"DriftScope: done in {sum(report.timings.values()):.0f}s, {flagged} flagged", cls.hidden.unique_id)
        return io.NodeOutput(report, table, ui=ui.PreviewText(table))
