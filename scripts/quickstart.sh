#!/usr/bin/env bash
# The README's first command, on a fresh clone: set up, learn a word for the orange cross (never seen by the model)
# with the seed's own command line on the shipped shapes model (CPU, a few minutes), draw "a photo of a *" and its
# edits, and say where everything is. The second command of the README runs the tests in the same environment.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
echo "installing (pip install -e \".[test]\") ..."
pip install -q -e ".[test]"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
logdir=logs/quickstart
python main.py --base configs/shapes/shapes-ldm-finetune.yaml -t --actual_resume models/shapes/model.ckpt \
    -n orange_cross --data_root models/shapes/concepts/orange_cross --init_word shape --accelerator cpu -l "$logdir"
run=$(ls -td "$logdir"/*_orange_cross | head -n 1)
# "a photo of a *", not the paper's "a photo of *": the shapes model has only seen captions with an article before
# the object, and its small text encoder draws random colours and backgrounds without it.
for prompt in "a photo of a *" "a photo of a * on a blue background" "a photo of a * on a green background"; do
    python scripts/txt2img.py --config configs/shapes/shapes-ldm-inference.yaml --ckpt_path models/shapes/model.ckpt \
        --embedding_path "$run/checkpoints/embeddings.pt" --prompt "$prompt" --n_samples 8 --n_iter 2 \
        --ddim_steps 20 --scale 3 --H 32 --W 32 --outdir "$run/samples"
done
echo
echo "Embedding: $run/checkpoints/embeddings.pt"
echo "Pictures:  $run/samples (one grid per prompt: $(ls "$run"/samples/*.png | head -n 1 | xargs basename), ...), training grids in $run/images/train"
