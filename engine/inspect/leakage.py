"""Duplicates and leakage: exact duplicates by a hash of the decoded pixels (or of the stored
bytes when images are not decoded), near duplicates by a perceptual hash (``imagehash``), and ids
found in more than one split. Memory grows by a few dozen bytes per image, never with its size."""

from __future__ import annotations

from array import array
from collections import defaultdict
from dataclasses import dataclass

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


class LeakIndex:
    """The exact and perceptual hashes and the ids seen so far. Per image it keeps one dict entry
    (its exact hash), its pHash (8 bytes in an array), its row key and, for ids, one small int
    (a bitmask of the splits it is in); later copies of an image are kept in a side table."""

    def __init__(self, exact_by: str = "pixels"):
        self.exact_by = exact_by
        self._split_index: dict[str, int] = {}
        self._splits: list[str] = []
        self._first: dict[int, int] = {}  # exact hash -> group
        self._members: list[tuple[int, str] | None] = []  # group -> its first (split index, key)
        self._more: dict[int, list[tuple[int, str]]] = {}  # group -> later copies (duplicates only)
        self._phashes = array("Q")  # per group, 0 where unknown
        self._leader = array("q")  # per group, the group leading its near cluster (-1: none)
        self._bands: list[dict[int, list[int]]] = [defaultdict(list) for _ in _BANDS]
        self._ids: dict[str, int] = {}  # id -> bitmask of the splits holding it
        self._repeated: dict[tuple[int, str], int] = {}  # (split, id) -> count, ids repeated within a split
        self._any_phash = False

    def _split(self, name: str) -> int:
        index = self._split_index.get(name)
        if index is None:
            index = self._split_index[name] = len(self._splits)
            self._splits.append(name)
        return index

    def add_id(self, split: str, image_id: str) -> None:
        bit = 1 << self._split(split)
        mask = self._ids.get(image_id, 0)
        if mask & bit:
            key = (self._split(split), image_id)
            self._repeated[key] = self._repeated.get(key, 1) + 1
        self._ids[image_id] = mask | bit

    def add_image(self, split: str, key: str, exact: bytes, phash: int | None) -> int:
        """Add one image's row; returns its group."""
        group = self.group_for(exact, phash)
        self.add_member(group, split, key)
        return group

    def group_for(self, exact: bytes, phash: int | None) -> int:
        """The group of images with this exact hash, made (with no rows yet) when new."""
        digest = int.from_bytes(exact, "little")
        group = self._first.get(digest)
        if group is not None:
            return group
        group = len(self._members)
        self._first[digest] = group
        self._members.append(None)
        self._phashes.append(phash or 0)
        self._leader.append(-1)
        if phash is not None:
            self._any_phash = True
            self._index_phash(group, phash)
        return group

    def add_member(self, group: int, split: str, key: str) -> None:
        member = (self._split(split), key)
        if self._members[group] is None:
            self._members[group] = member
        else:
            self._more.setdefault(group, []).append(member)

    def has_copies(self, group: int) -> bool:
        return group in self._more

    def join(self, exact: bytes, group: int) -> int:
        """File ``group`` under a second exact hash too (its decoded pixels, where groups are keyed by
        the stored bytes); when another group has it already, ``group`` merges into that one, which
        is returned."""
        holder = self._first.setdefault(int.from_bytes(exact, "little"), group)
        if holder != group:
            self.merge(holder, group)
        return holder

    def merge(self, into: int, group: int) -> None:
        """Move ``group``'s rows into ``into`` (two byte-hash groups found to hold the same pixels)."""
        moved = [m for m in [self._members[group], *self._more.pop(group, ())] if m is not None]
        self._members[group] = None
        if self._members[into] is None and moved:
            self._members[into] = moved.pop(0)
        if moved:
            self._more.setdefault(into, []).extend(moved)

    def drop(self, group: int) -> list[tuple[str, str]]:
        """Take ``group`` out of the duplicates (its image turned out not to decode); returns its rows."""
        rows = self._group(group)
        self._members[group] = None
        self._more.pop(group, None)
        self._leader[group] = -1
        return rows

    def _index_phash(self, group: int, phash: int) -> None:
        """Leader clustering: join the nearest earlier leader within NEAR_DISTANCE, else lead a new
        cluster. Unlike a transitive closure, a chain of small steps does not merge unlike images."""
        best, best_distance = -1, NEAR_DISTANCE + 1
        keys = [(phash >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in _BANDS]
        for band, k in zip(self._bands, keys):
            for leader in band.get(k, ())[:_BUCKET_SCAN]:
                distance = (self._phashes[leader] ^ phash).bit_count()
                if distance < best_distance:
                    best, best_distance = leader, distance
        if best >= 0:
            self._leader[group] = best
            return
        self._leader[group] = group
        for band, k in zip(self._bands, keys):
            band[k].append(group)

    def _group(self, group: int) -> list[tuple[str, str]]:
        first = self._members[group]
        return [(self._splits[s], k) for s, k in [*([first] if first else []), *self._more.get(group, ())]]

    def result(self) -> Leakage:
        exact = [Group(tuple(self._group(g))) for g in self._more]
        near = None
        if self._any_phash:
            clusters: dict[int, list[int]] = defaultdict(list)
            for g, leader in enumerate(self._leader):
                if leader >= 0:
                    clusters[leader].append(g)
            near = [
                Group(tuple(m for g in gs for m in self._group(g))) for gs in clusters.values() if len(gs) > 1
            ]
        shared = {
            i: [self._splits[b] for b in range(len(self._splits)) if mask >> b & 1]
            for i, mask in self._ids.items()
            if mask & (mask - 1)
        }
        repeated = {f"{self._splits[s]}/{i}": c for (s, i), c in self._repeated.items()}
        return Leakage(
            exact_by=self.exact_by,
            exact=exact,
            near=near,
            shared_ids=shared,
            repeated_ids=repeated,
            has_ids=bool(self._ids),
        )
