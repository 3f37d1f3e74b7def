"""LazyMapping: {key: tensor} made on access, so that a model-sized collection never needs to be resident.

Saliencies read from their files, matrices read from checkpoint shards and rank keys computed from z
and W are all such collections: each value is produced by `load(key)` when it is looked up, and kept
only while the kept values fit in `cache_bytes` (default 0: nothing kept).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping

import torch


class LazyMapping(Mapping):
    def __init__(self, keys: Iterable[Hashable], load: Callable[[Hashable], torch.Tensor], cache_bytes: int = 0):
        self._keys, self._load = list(keys), load
        self._known = set(self._keys)
        self._cache: dict = {}
        self._free = cache_bytes

    def __getitem__(self, key) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        if key in self._cache:
            return self._cache[key]
        value = self._load(key)
        size = value.numel() * value.element_size()
        if size <= self._free:
            self._cache[key] = value
            self._free -= size
        return value

    def __iter__(self) -> Iterator:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
