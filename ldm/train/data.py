"""``DataModuleFromConfig``: the Lightning data module the configs name (``main.DataModuleFromConfig``)."""
from __future__ import annotations

from functools import partial
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from ldm.train.resume import ResumableDataLoader
from ldm.util import instantiate_from_config


class WrappedDataset(Dataset):
    """Any object with ``__len__`` and ``__getitem__`` as a torch Dataset (the ``wrap: true`` option)."""

    def __init__(self, dataset: Any) -> None:
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> Any:
        return self.data[idx]


class DataModuleFromConfig(pl.LightningDataModule):
    def __init__(
        self,
        batch_size: int,
        train: Any = None,
        validation: Any = None,
        test: Any = None,
        predict: Any = None,
        wrap: bool = False,
        num_workers: int | None = None,
        shuffle_test_loader: bool = False,
        use_worker_init_fn: bool = False,
        shuffle_val_dataloader: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers is not None else batch_size * 2
        self.wrap = wrap
        self.dataset_configs = {k: v for k, v in (("train", train), ("validation", validation), ("test", test), ("predict", predict)) if v is not None}
        self.datasets: dict[str, Any] = {}
        # only the configured splits get a loader hook, so Lightning skips the others (e.g. no test set)
        hooks = {"train": "train_dataloader", "validation": "val_dataloader", "test": "test_dataloader", "predict": "predict_dataloader"}
        shuffles = {"train": True, "validation": shuffle_val_dataloader, "test": shuffle_test_loader, "predict": False}
        for name in self.dataset_configs:
            setattr(self, hooks[name], partial(self._loader, name, shuffles[name]))

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for name, config in self.dataset_configs.items():
            dataset = instantiate_from_config(config)
            self.datasets[name] = WrappedDataset(dataset) if self.wrap else dataset

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        # training: a loader Lightning resumes mid-epoch with the interrupted run's order and draws (ldm.train.resume)
        loader_class = ResumableDataLoader if name == "train" else DataLoader
        return loader_class(
            self.datasets[name], batch_size=self.batch_size, num_workers=self.num_workers, shuffle=shuffle,
            persistent_workers=self.num_workers > 0,
        )

    def has(self, name: str) -> bool:
        return name in self.dataset_configs
