"""Best of several starts: each start trains from the init word plus noise, and the lowest deterministic loss wins."""
import pytorch_lightning as pl
import torch

from ldm.train.restarts import BestOfRestarts
from ldm.train.validation import DeterministicLoss, deterministic_loss
from test_validation import StepRecorder, build, tiny  # noqa: F401  (tiny is a fixture)


def test_keeps_the_start_with_the_lowest_deterministic_loss(tiny):
    pl.seed_everything(5, workers=True)
    model, data = build(tiny)
    watcher, restarts, recorder = DeterministicLoss(every_n_steps=2, batch_size=4), BestOfRestarts(candidates=3, noise=0.5, score_evals=1), StepRecorder()
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[watcher, restarts, recorder])
    trainer.fit(model, data)
    assert [step for _, step, _ in restarts.results] == [4, 8, 12]  # the budget split three ways
    scores = [score for score, _, _ in restarts.results]
    assert len(set(scores)) == 3
    best = restarts.results[scores.index(min(scores))]
    kept = model.embedding_manager.string_to_param_dict["*"].detach()
    assert torch.equal(kept, best[2]["*"])
    # each start began away from the others: the vectors right after each restart differ from the init word by the noise
    init = model.embedding_manager.initial_embeddings["*"]
    assert not torch.allclose(recorder.vectors[4], init, atol=1e-3) and not torch.equal(recorder.vectors[4], recorder.vectors[8])
    batch = watcher.batch
    assert abs(deterministic_loss(model, batch) - min(scores)) < 1e-12


def test_every_start_is_saved_when_asked(tiny, tmp_path):
    from ldm.modules.embedding_manager import read_embedding_file

    pl.seed_everything(6, workers=True)
    model, data = build(tiny)
    prompts = ["a photo of a * on a red background", "a photo of a * in a box"]
    restarts = BestOfRestarts(candidates=2, noise=0.5, score_evals=1, save_starts=True, signal_prompts=prompts)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=str(tmp_path), callbacks=[DeterministicLoss(every_n_steps=2, batch_size=4), restarts])
    trainer.fit(model, data)
    saved = [read_embedding_file(tmp_path / f"start{k}.pt").vectors["*"] for k in (1, 2)]
    assert all(torch.equal(file, vectors["*"]) for file, (_, _, vectors) in zip(saved, restarts.results))
    kept = model.embedding_manager.string_to_param_dict["*"].detach()
    assert sum(torch.equal(kept, file) for file in saved) == 1
    first = torch.load(tmp_path / "start1.pt", weights_only=True)
    assert first["deterministic_loss"] == restarts.results[0][0]
    # each start's override signals, computed on its own vectors (the same numbers as the module gives for them)
    from ldm.train.override import override_signals

    assert first["signals"] == restarts.signals[0] and len(restarts.signals) == 2
    model.embedding_manager.string_to_param_dict["*"].data.copy_(saved[0])
    assert override_signals(model.eval(), prompts) == restarts.signals[0]


def test_signal_prompts_need_two_contexts():
    import pytest

    from ldm.errors import ConfigError

    with pytest.raises(ConfigError, match="at least two prompts"):
        BestOfRestarts(signal_prompts=["a photo of a * on a red background"])
