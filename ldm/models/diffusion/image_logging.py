"""What LatentDiffusion shows of itself during training: inputs, reconstructions, captions as pictures, and
samples without and with classifier-free guidance (the ``samples_scaled`` grid textual inversion added).

Sampler steps and eta are arguments (the ImageLogger passes its config's ``log_images_kwargs``), so logging never has
to dominate a run.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.models.diffusion.ddim import DDIMSampler


def log_txt_as_img(wh: tuple[int, int], xc: list[str], size: int = 10) -> torch.Tensor:
    """Render each caption on a white canvas with PIL's default font (no font file needed); [-1, 1] BCHW."""
    font = ImageFont.load_default()
    chars_per_line = max(1, int(40 * (wh[0] / 256)))
    pictures = []
    for text in xc:
        canvas = Image.new("RGB", wh, color="white")
        lines = "\n".join(text[start : start + chars_per_line] for start in range(0, len(text), chars_per_line))
        ImageDraw.Draw(canvas).text((0, 0), lines, fill="black", font=font)
        pictures.append(np.asarray(canvas).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.tensor(np.stack(pictures), dtype=torch.float32)


class ImageLoggingMixin:
    """``log_images`` with the original's keys and defaults, and the sampler call it uses."""

    @torch.no_grad()
    def sample_log(self, cond: Any, batch_size: int, ddim: bool, ddim_steps: int | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """Samples of the latent shape; without ``ddim`` every timestep is visited (DDIM, all T steps)."""
        shape = (self.channels, self.image_size, self.image_size)
        steps = ddim_steps if ddim else self.num_timesteps
        return DDIMSampler(self).sample(steps, batch_size, shape, cond, verbose=False, **kwargs)

    @torch.no_grad()
    def log_images(
        self,
        batch: dict,
        N: int = 8,
        n_row: int = 4,
        sample: bool = True,
        ddim_steps: int | None = 200,
        ddim_eta: float = 1.0,
        unconditional_guidance_scale: float = 5.0,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        log: dict[str, torch.Tensor] = {}
        z, c, x, xrec, xc = self.get_input(
            batch, self.first_stage_key, return_first_stage_outputs=True, force_c_encode=True, return_original_cond=True, bs=N
        )
        n = min(x.shape[0], N)
        log["inputs"] = x
        log["reconstruction"] = xrec
        if self.model.conditioning_key is not None and isinstance(xc, (list, tuple)):
            log["conditioning"] = log_txt_as_img((x.shape[3], x.shape[2]), list(xc)[:n]).to(self.device)
        if sample:
            use_ddim = ddim_steps is not None
            with self.ema_scope("Plotting"):
                samples, _ = self.sample_log(cond=c, batch_size=n, ddim=use_ddim, ddim_steps=ddim_steps, eta=ddim_eta)
                log["samples"] = self.decode_first_stage(samples)
                if self.model.conditioning_key is not None:
                    uc = self.get_learned_conditioning(n * [""])
                    scaled, _ = self.sample_log(
                        cond=c, batch_size=n, ddim=use_ddim, ddim_steps=ddim_steps, eta=ddim_eta,
                        unconditional_guidance_scale=unconditional_guidance_scale, unconditional_conditioning=uc,
                    )
                    log["samples_scaled"] = self.decode_first_stage(scaled)
        return log
