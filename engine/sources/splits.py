"""A folder's splits as ``datasets.load_dataset`` finds them (``datasets.data_files``:
``get_data_patterns`` and ``DataFilesDict.from_patterns``, datasets 5.x with fsspec >= 2023.12),
without importing ``datasets``: its import takes about a second, which a small job's planning
would wait for. ``tests/unit`` compares every result with datasets' own on the same folders."""

from __future__ import annotations

import posixpath
import re
from glob import has_magic

SPLIT_PATTERN_SHARDED = "data/{split}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*"
SPLIT_KEYWORDS = {
    "train": ["train", "training"],
    "validation": ["validation", "valid", "dev", "val"],
    "test": ["test", "testing", "eval", "evaluation"],
}
NON_WORDS_CHARS = "-._ 0-9"
IN_FILENAME = ["**/{keyword}[{sep}]*", "**/*[{sep}]{keyword}[{sep}]*"]
IN_DIR_NAME = [
    "**/{keyword}/**",
    "**/{keyword}[{sep}]*/**",
    "**/*[{sep}]{keyword}/**",
    "**/*[{sep}]{keyword}[{sep}]*/**",
]
DEFAULT_SPLITS = ["train", "validation", "test"]
ALL_DEFAULT_PATTERNS = [
    {"logs": ["**/*.eval"]},
    {"test": ["**/task.toml", "**/instruction.md"]},
    {
        s: [p.format(keyword=k, sep=NON_WORDS_CHARS) for k in SPLIT_KEYWORDS[s] for p in IN_DIR_NAME]
        for s in DEFAULT_SPLITS
    },
    {
        s: [p.format(keyword=k, sep=NON_WORDS_CHARS) for k in SPLIT_KEYWORDS[s] for p in IN_FILENAME]
        for s in DEFAULT_SPLITS
    },
    {"train": ["**"]},
]
UNSPLIT = {"train": ["**"]}  # no split in any name
FILES_TO_IGNORE = {
    "README.md",
    "config.json",
    "dataset_info.json",
    "dataset_infos.json",
    "dummy_data.zip",
    "dataset_dict.json",
}
_SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")


class NoDataFiles(FileNotFoundError):
    pass


class Tree:
    """Every file under ``root``, listed once: each pattern is then matched as ``fs.glob``
    matches it (fsspec's glob_translate), not by another walk of the folder."""

    def __init__(self, fs, root: str):
        self.root = root.rstrip("/") or "/"
        self.files = sorted(
            p for p, info in fs.find(self.root, detail=True).items() if info.get("type") == "file"
        )
        self._all = set(self.files)

    def glob(self, full: str) -> list[str]:
        if not has_magic(full):
            return [full] if full in self._all else []
        from fsspec.utils import glob_translate

        regex = re.compile(glob_translate(full))
        return [p for p in self.files if regex.match(p)]


def resolve_pattern(tree: Tree, pattern: str) -> list[str]:
    """The files ``pattern`` matches under the tree's root (paths of its file system), as datasets'
    resolve_pattern: files only, never README.md and the like (unless named), nor hidden or
    ``__special__`` parts the pattern does not name."""
    full = posixpath.join(tree.root, pattern)
    ignored = FILES_TO_IGNORE - {posixpath.basename(pattern)}
    found = []
    wanted = full.split("/")
    special, hidden = _count(wanted[:-1], "__"), _hidden(wanted)
    for path in tree.glob(full):
        parts = path.split("/")
        if parts[-1] in ignored or _count(parts[:-1], "__") != special or _hidden(parts) != hidden:
            continue
        found.append(path)
    return found


def _count(parts, prefix: str) -> int:
    return sum(p.startswith(prefix) for p in parts)


def _hidden(parts) -> int:
    return sum(p.startswith(".") and set(p) != {"."} for p in parts)


def data_patterns(tree: Tree) -> dict[str, list[str]]:
    """Split -> patterns: ``data/{split}-xxxxx-of-xxxxx`` shards, else the first of datasets'
    default pattern sets (split-named folders, then file names, then everything) that matches."""
    sharded = resolve_pattern(tree, SPLIT_PATTERN_SHARDED.replace("{split}", "*"))
    if sharded:
        regex = re.compile(r"^(?P<split>.+)-[0-9]{5}-of-[0-9]{5}.*\..*$")
        splits = {m.group("split") for m in (regex.match(posixpath.basename(p)) for p in sharded) if m}
        if any(not _SPLIT_NAME.match(s) for s in splits):
            raise ValueError(f"split names must match {_SPLIT_NAME.pattern}, not {sorted(splits)}")
        ordered = [s for s in DEFAULT_SPLITS if s in splits] + sorted(splits - set(DEFAULT_SPLITS))
        return {s: [SPLIT_PATTERN_SHARDED.format(split=s)] for s in ordered}
    for patterns in ALL_DEFAULT_PATTERNS:
        found = [
            s
            for s, split_patterns in patterns.items()
            if any(resolve_pattern(tree, p) for p in split_patterns)
        ]
        if found:
            return {s: patterns[s] for s in found}
    raise NoDataFiles(f"{tree.root} holds no data files")


def data_files(tree: Tree, patterns: dict[str, list[str]]) -> dict[str, list[str]]:
    """Split -> files, pattern by pattern (a pattern with wildcards may match nothing)."""
    out: dict[str, list[str]] = {}
    for split, split_patterns in patterns.items():
        files: list[str] = []
        for pattern in split_patterns:
            matched = resolve_pattern(tree, pattern)
            if not matched and not has_magic(pattern):
                raise NoDataFiles(f"{posixpath.join(tree.root, pattern)} not found")
            files += matched
        out[split] = files
    return out
