"""engine.sources.splits against datasets' own split discovery, on the same folders."""

from __future__ import annotations

import fsspec
import pytest

from engine.sources import splits

LAYOUTS = {
    "sharded": [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/test-00000-of-00001.parquet",
        "data/random-00000-of-00001.parquet",
        "README.md",
    ],
    "split folders": [
        "train/a.jpg",
        "train/sub/b.jpg",
        "valid/c.png",
        "testing/d.jpg",
        "train/metadata.jsonl",
    ],
    "file names": ["my_train_1.parquet", "train.parquet", "dev-0.parquet", "x.parquet", "eval.csv"],
    "flat": ["a.jpg", "b/c.png", "metadata.csv", "config.json"],
    "hidden and special": [
        "train/a.jpg",
        "train/.cache/b.jpg",
        ".git/c.jpg",
        "__pycache__/d.jpg",
        "test/e.jpg",
        "dataset_info.json",
    ],
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_patterns_and_files_are_datasets_own(tmp_path, name):
    from datasets.data_files import DataFilesDict, get_data_patterns

    for rel in LAYOUTS[name]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    tree = splits.Tree(*fsspec.core.url_to_fs(str(tmp_path)))
    ours = splits.data_patterns(tree)
    theirs = get_data_patterns(str(tmp_path))
    assert ours == {str(k): v for k, v in theirs.items()}
    resolved = DataFilesDict.from_patterns(theirs, base_path=str(tmp_path))
    assert splits.data_files(tree, ours) == {str(k): list(v) for k, v in resolved.items()}


def test_an_empty_folder_has_no_data_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        splits.data_patterns(splits.Tree(*fsspec.core.url_to_fs(str(tmp_path))))


def test_image_extensions_are_datasets_own():
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    from engine.sources.imagefolder import IMAGE_EXTENSIONS

    assert IMAGE_EXTENSIONS == frozenset(ImageFolder.EXTENSIONS)
