"""Packaging for the textual-inversion re-implementation (package ``ldm``)."""
from setuptools import find_packages, setup

setup(
    name="textual-inversion",
    version="0.1.0",
    description="Textual inversion (Gal et al., 2022) on latent diffusion: faithful, checkpoint-compatible, offline-capable.",
    packages=find_packages(include=["ldm", "ldm.*", "evaluation", "evaluation.*"]),
    py_modules=["main", "merge_embeddings"],
    package_data={"ldm": ["modules/encoders/vocab/*", "modules/encoders/vocab/**/*"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "numpy>=1.22",
        "tqdm>=4.60",
        "pytorch-lightning>=2.1,<3",
        "omegaconf>=2.1",
        "transformers>=4.40,<6",
        "tokenizers>=0.15",
        "einops>=0.6",
        "pillow>=9.0",
        "safetensors>=0.4",
        "ftfy>=6.1",
        "regex>=2022.1",
        "matplotlib>=3.5",
    ],
    # tensorboard: runs also log to TensorBoard (`tensorboard --logdir logs`); without it they log to CSV alone
    # peer: diffusers, for scripts/convert_to_diffusers.py and the side-by-side with diffusers' trainer; never needed by
    # main.py, the generation scripts or merge_embeddings.py
    extras_require={"test": ["pytest>=7", "diffusers>=0.30"], "peer": ["diffusers>=0.30"], "tensorboard": ["tensorboard>=2.10"]},
)
