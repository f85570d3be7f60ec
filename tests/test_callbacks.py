"""ldm/train/callbacks.py: the loss curve covers every version of a resumed run."""
from __future__ import annotations

from PIL import Image

from ldm.train.callbacks import plot_loss_curve, read_losses, run_metrics


def write_metrics(folder, rows):
    folder.mkdir(parents=True)
    lines = ["epoch,lr-AdamW,step,train/loss_step"] + [f"0,,{step},{loss}" for step, loss in rows]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n0,0.005,9,\n")


def test_the_curve_reads_all_versions_in_order(tmp_path):
    csv_root = tmp_path / "csv"
    write_metrics(csv_root / "version_0", [(0, 1.0), (1, 0.9), (2, 0.8)])
    write_metrics(csv_root / "version_1", [(2, 0.7), (3, 0.6)])  # resumed: step 2 again, then on
    write_metrics(csv_root / "version_10", [(4, 0.5)])  # numeric order, not "version_1" < "version_10" < "version_2"
    (csv_root / "version_x").mkdir()
    paths = run_metrics(csv_root)
    assert [p.parent.name for p in paths] == ["version_0", "version_1", "version_10"]
    assert read_losses(paths) == ([0, 1, 2, 3, 4], [1.0, 0.9, 0.7, 0.6, 0.5])
    plot_loss_curve(paths, tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as image:
        assert image.size == (600, 350)
