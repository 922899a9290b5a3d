"""DriftScope Evidence Grid node: base/adapted images of the top words, made with ComfyUI's
normal sampler at full quality, in a labeled grid with difference maps."""
from __future__ import annotations

import math

import numpy as np
import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils

from ..driftscope_core.grid import GridRow, render_grid
from ..driftscope_core.report import DriftReport
from . import compat, errors
from .sockets import DriftReportType


def encode(clip, text: str):
    """CONDITIONING of a prompt, as CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def with_guidance(conditioning, guidance: float | None):
    """The conditioning with a distilled guidance value, as the FluxGuidance node sets it."""
    if guidance is None:
        return conditioning
    return [[cond, {**extra, "guidance": guidance}] for cond, extra in conditioning]


def sample_image(model, vae, positive, negative, *, seed, steps, cfg, sampler_name, scheduler, width, height):
    """One image (H, W, 3) in [0, 1] through comfy.sample.sample, the stock KSampler path."""
    latent = torch.zeros(1, model.model.latent_format.latent_channels, height // 8, width // 8)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                  seed=seed, disable_pbar=True)
    images = vae.decode(samples)  # (B, H, W, 3), or (B, T, H, W, 3) from a video VAE (Qwen-Image's: one frame)
    return images.reshape(-1, *images.shape[-3:])[0].float().clamp(0, 1)  # (H, W, 3)


def evidence_images(report: DriftReport, base_model, base_clip, adapted_model, adapted_clip, vae, *, top_n, seed,
                    steps, cfg, sampler_name, scheduler, width, height, node_id=None):
    """Grid image (1, H, W, 3) and interleaved base/adapted pairs (2N, h, w, 3)."""
    entries = report.entries[:top_n]
    if not entries:
        raise ValueError("report: the audit reported no words, so there is nothing to show")
    template = report.templates[0]
    settings = dict(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                    width=width or report.settings["width"], height=height or report.settings["height"])
    guidance = report.settings.get("guidance")  # a guidance-distilled model's (Flux dev), as the audit ran it
    bar = comfy.utils.ProgressBar(2 * len(entries), node_id=node_id)
    rows, pairs = [], []
    for e in entries:
        prompt = template.replace("{}", e.token)
        images = []
        for model, clip in ((base_model, base_clip), (adapted_model, adapted_clip)):
            # a cancel point between images; inside one, ComfyUI's layers check at every op
            comfy.model_management.throw_exception_if_processing_interrupted()
            positive = with_guidance(encode(clip, prompt), guidance)
            images.append(sample_image(model, vae, positive, encode(clip, ""), **settings))
            bar.update(1)
        pairs += images
        flag = "flagged" if e.significant else "not flagged"
        rows.append(GridRow(label=f"{e.rank}. {e.token}", caption=f"drift {e.drift:.3g}  z {e.calibrated:.1f}\n{flag}\n{prompt}",
                            base=images[0].cpu().numpy(), adapted=images[1].cpu().numpy()))
    title = f"DriftScope evidence: {report.vocabulary['name']}, seed {seed}; differences on one scale"
    grid = np.asarray(render_grid(rows, title=title), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(grid)[None], torch.stack(pairs)


class DriftScopeEvidenceGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return compat.schema(
            node_id="DriftScopeEvidenceGrid",
            display_name="DriftScope Evidence Grid",
            category="DriftScope",
            search_aliases=["drift evidence", "lora comparison grid", "base vs adapted", "concept drift"],
            description="Renders base and adapted images of the report's top words with ComfyUI's normal "
                        "sampler (same prompt, seed and settings for both) and lays them out in a labeled "
                        "grid: base | adapted | difference map.",
            inputs=[
                DriftReportType.Input("report", tooltip="The report of a DriftScope Audit node."),
                io.Model.Input("base_model", tooltip="The same base model the audit saw."),
                io.Clip.Input("base_clip", tooltip="The base model's CLIP."),
                io.Model.Input("adapted_model", tooltip="The same adapted model the audit saw."),
                io.Clip.Input("adapted_clip", tooltip="The adapted model's CLIP."),
                io.Vae.Input("vae", tooltip="VAE to decode the images (the checkpoint's VAE)."),
                io.Int.Input("top_n", default=4, min=1, max=50, tooltip="How many of the top words to show."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=compat.fixed_seed_control(),
                             tooltip="Sampling seed, shared by base and adapted. Fixed by default, so the evidence "
                                     "matches the report it was made for when the workflow is queued again."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps of each image (full sampling, unlike the audit's truncated steps)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1, tooltip="Classifier-free guidance scale: 7.5 for SD1.x, SD2.x and SDXL, 1.0 for Flux dev and schnell (Flux dev's distilled guidance comes from the audit's report)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler", tooltip="Sampler of the image pairs, as in KSampler; base and adapted use the same one."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal", tooltip="Sigma schedule of the image pairs, as in KSampler."),
                io.Int.Input("width", default=0, min=0, max=4096, step=8, tooltip="Image width; 0 uses the audit's width."),
                io.Int.Input("height", default=0, min=0, max=4096, step=8, tooltip="Image height; 0 uses the audit's height."),
            ],
            outputs=[
                io.Image.Output("grid", tooltip="The labeled grid: one row per word, base | adapted | difference."),
                io.Image.Output("pairs", tooltip="The images as a batch: base, adapted, base, adapted, ..."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, report, base_model, base_clip, adapted_model, adapted_clip, vae, top_n, seed, steps, cfg,
                sampler_name, scheduler, width, height) -> io.NodeOutput:
        if not math.isfinite(cfg):
            raise ValueError(f"cfg {cfg}: give a finite guidance scale (e.g. 7.5)")
        if width % 8 or height % 8:
            raise ValueError(f"width/height {width}x{height}: use multiples of 8 (or 0 for the audit's size)")
        size = (width or report.settings["width"], height or report.settings["height"])
        with errors.out_of_memory_advice("DriftScope Evidence Grid", errors.grid_advice(top_n, *size)):
            grid, pairs = evidence_images(report, base_model, base_clip, adapted_model, adapted_clip, vae, top_n=top_n,
                                          seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                                          width=width, height=height, node_id=cls.hidden.unique_id)
        return io.NodeOutput(grid, pairs)
