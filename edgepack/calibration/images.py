"""Image data sets held as images: each model input is made when it is read, one chunk at a time, so a
set costs its images (uint8 at the model's size), not its float32 tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from edgepack import preprocess as pp


class PreprocessedImages(Sequence):
    """Model inputs made from images when they are read: the set holds each image after :func:`geometry
    <edgepack.preprocess.geometry>` (uint8 at the model's size for RGB photos: a quarter of the float32
    input) and the last :attr:`CHUNK` inputs it made, so a data set costs its images, not its tensors.
    Reading a sample again gives the same values (the same code runs on the same image)."""

    CHUNK = 32

    def __init__(self, images: list[np.ndarray], name: str, pre: dict, dtype: str):
        self.images, self.name, self.pre, self.dtype = images, name, pre, dtype
        self._chunk: tuple[int, list[dict[str, np.ndarray]]] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def _make(self, i: int) -> dict[str, np.ndarray]:
        return {self.name: pp.normalize(self.pre, self.images[i], self.dtype)[None]}

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices; IndexError past the end
        start = i - i % self.CHUNK
        if self._chunk is None or self._chunk[0] != start:
            self._chunk = None  # let the last chunk go before the next is made: one chunk at a time
            self._chunk = (start, [self._make(j) for j in range(start, min(start + self.CHUNK, len(self)))])
        return self._chunk[1][i - start]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict[str, Any]:  # a pickled set (a cluster task's) carries the images only
        return {**self.__dict__, "_chunk": None}

    def subset(self, idx: list[int]) -> PreprocessedImages:
        return PreprocessedImages([self.images[i] for i in idx], self.name, self.pre, self.dtype)
