"""Generate pictures with a Stable Diffusion model (v1; SD 2.x and SDXL with their ``--config``) and a learned embedding.

Example: ``python scripts/stable_txt2img.py --ddim_eta 0.0 --n_samples 8 --n_iter 2 --scale 10.0 --ddim_steps 50
--embedding_path logs/<run>/checkpoints/embeddings.pt --ckpt models/ldm/stable-diffusion-v1/model.ckpt
--prompt "a photo of *"``. SDXL: ``--config configs/stable-diffusion-xl/sdxl-inference.yaml --ckpt
sd_xl_base_1.0.safetensors --embedding_path <word>.safetensors`` (any SDXL layout). All options: ``--help``; the
shared implementation is :mod:`ldm.generate`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.generate import SD_DEFAULTS, main  # noqa: E402

if __name__ == "__main__":
    main(SD_DEFAULTS, "Text-to-image with Stable Diffusion (v1; SD 2.x and SDXL with their --config) and a textual-inversion embedding.")
