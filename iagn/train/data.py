"""The data a training or evaluation step needs: manifest, splits, loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

from iagn.data.dataset import FineGrainedDataset, build_transform, carve_validation
from iagn.data.formats import load_manifest, resolve
from iagn.data.manifest import class_names, manifest_digest
from iagn.train.config import DataConfig, data_config, resolve_data_dir


@dataclass
class PreparedData:
    root: Path
    format: str
    manifest: pd.DataFrame  # with the validation split carved
    class_names: list[str]
    digest: str  # of the manifest as read (before carving): the dataset's identity
    config: DataConfig

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def identity(self) -> dict:
        """What a checkpoint records about its data: enough to check it and to preprocess."""
        return {
            "digest": self.digest,
            "format": self.format,
            "root": str(self.root),
            "class_names": self.class_names,
            "resize": self.config.resize,
            "crop": self.config.crop,
            # predict, explain and serving decode with the limit the training data had
            "max_pixels": self.config.max_pixels,
        }

    def split_digest(self, split: str) -> str:
        """The identity of one split's images (after carving val): what an evaluation on it
        measured, so two evaluations compare only when they saw the same images."""
        return manifest_digest(self.manifest[self.manifest["split"] == split])

    def dataset(self, split: str | None, train: bool) -> FineGrainedDataset:
        transform = build_transform(train, self.config.resize, self.config.crop)
        return FineGrainedDataset(
            self.manifest, self.root, split, transform, max_pixels=self.config.max_pixels
        )

    def loader(
        self,
        split: str,
        train: bool,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        num_workers: int = 0,
        distributed: bool = False,
    ) -> DataLoader:
        """Shuffled with a generator seeded by (seed, epoch) when training, so a resumed
        run sees exactly the batches an uninterrupted run would have seen."""
        dataset = self.dataset(split, train)
        sampler = None
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        if distributed:
            sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=train)
            sampler.set_epoch(epoch)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            generator=generator if sampler is None else None,
            num_workers=num_workers,
            drop_last=train and len(dataset) > batch_size,
            persistent_workers=False,
        )


def prepare_data(data_dir: str | Path, config: DataConfig) -> PreparedData:
    name, root = resolve(data_dir, config.format_or_none)
    manifest = load_manifest(
        root,
        name,
        max_pixels=config.max_pixels,
        allow_outside_root=config.allow_outside_root,
    )
    return PreparedData(
        root=root,
        format=name,
        manifest=carve_validation(manifest, config.val_fraction, config.split_seed),
        class_names=class_names(manifest),
        digest=manifest_digest(manifest),
        config=config,
    )


def prepare_step_data(data: str | Path | None, params: dict) -> PreparedData:
    """The dataset a step works on: the folder `data`, else params.yaml's data.root."""
    config = data_config(params)
    return prepare_data(resolve_data_dir(data, config), config)
