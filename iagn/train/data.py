"""The data a training or evaluation step needs: manifest, splits, loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler

from iagn.data.dataset import FineGrainedDataset, build_transform, carve_validation
from iagn.data.formats import load_manifest, resolve
from iagn.data.manifest import class_names, manifest_digest
from iagn.errors import IagnError
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
        rank: int = 0,
        world_size: int = 1,
    ) -> DataLoader:
        """Shuffled with a generator seeded by (seed, epoch) when training, so a resumed
        run sees exactly the batches an uninterrupted run would have seen.

        `batch_size` is the global batch. With `world_size` > 1 (training under torchrun)
        this is rank `rank`'s loader: its batches are its slice of each global batch
        (`ShardedGlobalBatches`), and the global batches are the very ones one process
        draws, so W processes step on the same images as one process does."""
        dataset = self.dataset(split, train)
        generator = torch.Generator().manual_seed(loader_seed(seed, epoch))
        if world_size > 1 and train:
            sharded = ShardedGlobalBatches(
                len(dataset), batch_size, rank, world_size, loader_seed(seed, epoch)
            )
            # No generator: each rank's worker seeds come from its own (seeded) global RNG.
            return DataLoader(
                dataset,
                batch_sampler=sharded,
                num_workers=num_workers,
                persistent_workers=False,
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            generator=generator,
            num_workers=num_workers,
            drop_last=train and len(dataset) > batch_size,
            persistent_workers=False,
        )


def loader_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's shuffle (the same on every rank)."""
    return seed * 100_003 + epoch


def global_order(size: int, seed: int) -> list[int]:
    """The order one process's shuffled training DataLoader visits `size` images in, for a
    generator seeded with `seed`: the DataLoader first draws its workers' base seed from
    the generator, then RandomSampler draws the permutation (tests/test_distributed.py
    checks this stays so)."""
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(size, generator=generator).tolist()


class ShardedGlobalBatches(Sampler[list[int]]):
    """Rank `rank`'s batches of an epoch: a contiguous 1/W slice of each global batch.

    The global batches are one process's (`global_order`, `global_batch` images each, the
    incomplete last one dropped); joined in rank order, the ranks' k-th batches are one
    process's k-th batch. With fewer images than a global batch, the one batch is the
    largest multiple of W of them (one process takes all)."""

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int):
        if global_batch % world_size:
            raise IagnError(
                f"a global batch of {global_batch} does not split over {world_size} processes"
            )
        if size < world_size:
            raise IagnError(
                f"the training split has {size} image(s), fewer than the {world_size} "
                "processes; use fewer processes or more images"
            )
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.rank, self.world_size = rank, world_size

    def _batches(self) -> list[tuple[int, int]]:
        """(start, length) of each global batch in the epoch's order."""
        if self.size <= self.global_batch:
            return [(0, self.size - self.size % self.world_size)]
        count = self.size // self.global_batch
        return [(k * self.global_batch, self.global_batch) for k in range(count)]

    def __iter__(self):
        order = global_order(self.size, self.seed)
        for start, length in self._batches():
            share = length // self.world_size
            first = start + self.rank * share
            yield order[first : first + share]

    def __len__(self) -> int:
        return len(self._batches())


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
