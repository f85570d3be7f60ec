"""Generate pictures with an LDM-1.4B model (BERT-style text encoder) and a learned embedding.

Example: ``python scripts/txt2img.py --ddim_eta 0.0 --n_samples 8 --n_iter 2 --scale 10.0 --ddim_steps 50
--embedding_path logs/<run>/checkpoints/embeddings.pt --ckpt_path models/ldm/text2img-large/model.ckpt
--prompt "a photo of *"``. All options: ``--help``; the shared implementation is :mod:`ldm.generate`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.generate import LDM_DEFAULTS, main  # noqa: E402

if __name__ == "__main__":
    main(LDM_DEFAULTS, "Text-to-image with LDM-1.4B and a textual-inversion embedding.")
