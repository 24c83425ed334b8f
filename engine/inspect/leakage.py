"""Duplicates and leakage: exact duplicates by a hash of the decoded pixels (or of the stored
bytes when images are not decoded), near duplicates by a perceptual hash (``imagehash``), and ids
found in more than one split. Memory grows by a few dozen bytes per image, never with its size."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

NEAR_DISTANCE = 4  # Hamming distance of two 64-bit pHashes at most this: a near duplicate
# pigeonhole: two hashes within NEAR_DISTANCE bits agree exactly on one of NEAR_DISTANCE + 1 bands
_BANDS = [(start, min(start + 13, 64)) for start in range(0, 64, 13)]
_BUCKET_SCAN = 256  # at most this many earlier hashes compared per band, so flat images stay cheap


@dataclass(frozen=True)
class Group:
    """Rows holding the same (or nearly the same) image: (split, key) pairs, first seen first."""

    members: tuple[tuple[str, str], ...]

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.members))

    @property
    def cross_split(self) -> bool:
        return len(self.splits) > 1


@dataclass
class Leakage:
    exact_by: str  # "pixels" or "bytes"
    exact: list[Group]
    near: list[Group] | None  # None when no perceptual hash was computed
    shared_ids: dict[str, list[str]]  # id -> splits, ids in more than one split
    repeated_ids: dict[str, int]  # split/id -> count, ids repeated within a split
    has_ids: bool

    @property
    def exact_cross(self) -> list[Group]:
        return [g for g in self.exact if g.cross_split]

    @property
    def exact_within(self) -> list[Group]:
        return [g for g in self.exact if not g.cross_split]

    @property
    def near_cross(self) -> list[Group]:
        return [g for g in self.near or [] if g.cross_split]


@dataclass
class LeakIndex:
    exact_by: str = "pixels"
    _first: dict[bytes, int] = field(default_factory=dict)  # exact hash -> group index
    _groups: list[list[tuple[str, str]]] = field(default_factory=list)
    _phashes: list[int] = field(default_factory=list)  # per exact group, 0 where unknown
    _bands: list[dict[int, list[int]]] = field(default_factory=lambda: [defaultdict(list) for _ in _BANDS])
    _parent: list[int] = field(default_factory=list)  # per exact group, the leader of its near cluster
    _ids: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    _id_counts: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    _any_phash: bool = False

    def add_id(self, split: str, image_id: str) -> None:
        self._ids[image_id].add(split)
        self._id_counts[(split, image_id)] += 1

    def add_image(self, split: str, key: str, exact: bytes, phash: int | None) -> None:
        group = self._first.get(exact)
        if group is not None:
            self._groups[group].append((split, key))
            return
        group = len(self._groups)
        self._first[exact] = group
        self._groups.append([(split, key)])
        self._parent.append(group)
        self._phashes.append(phash or 0)
        if phash is not None:
            self._any_phash = True
            self._index_phash(group, phash)

    def _index_phash(self, group: int, phash: int) -> None:
        """Leader clustering: join the nearest earlier leader within NEAR_DISTANCE, else lead a new
        cluster. Unlike a transitive closure, a chain of small steps does not merge unlike images."""
        best, best_distance = None, NEAR_DISTANCE + 1
        for band, (lo, hi) in zip(self._bands, _BANDS):
            for leader in band.get((phash >> lo) & ((1 << (hi - lo)) - 1), ())[:_BUCKET_SCAN]:
                distance = (self._phashes[leader] ^ phash).bit_count()
                if distance < best_distance:
                    best, best_distance = leader, distance
        if best is not None:
            self._parent[group] = best
            return
        for band, (lo, hi) in zip(self._bands, _BANDS):
            band[(phash >> lo) & ((1 << (hi - lo)) - 1)].append(group)

    def result(self) -> Leakage:
        exact = [Group(tuple(m)) for m in self._groups if len(m) > 1]
        near = None
        if self._any_phash:
            clusters: dict[int, list[int]] = defaultdict(list)
            for g in range(len(self._groups)):
                clusters[self._parent[g]].append(g)
            near = [Group(tuple(m for g in gs for m in self._groups[g])) for gs in clusters.values() if len(gs) > 1]
        shared = {i: sorted(s) for i, s in self._ids.items() if len(s) > 1}
        repeated = {f"{s}/{i}": c for (s, i), c in self._id_counts.items() if c > 1}
        return Leakage(exact_by=self.exact_by, exact=exact, near=near, shared_ids=shared, repeated_ids=repeated,
                       has_ids=bool(self._ids))
