"""The work folder OUT/.engine (engine.workdir): the fingerprint a resumed run must match, the
unit checkpoints it trusts (and the torn or short ones it redoes), and what says 'finished'."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import orjson
import pytest

from engine import workdir
from engine.config import ConvertOptions, ImageOptions, parse_task_config
from engine.errors import UsageError
from engine.sinks.store import Store
from engine.workdir import (
    RUN_FILE,
    WORK_DIR,
    UnitResult,
    check_finished_matches,
    is_finished,
    load_unit_result,
    prepare_out,
    run_fingerprint,
    run_state,
    unit_paths,
)

TASK = parse_task_config(
    json.dumps({"instructions": "Read the price.", "json_schema": {"type": "object"}}).encode()
)


def _opts(out: Path, manifest: Path, **kw) -> ConvertOptions:
    return ConvertOptions(manifest=str(manifest), out=str(out), config="config.json", **kw)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b'{"image_id": "a", "image": "a.jpg", "output": "{}"}\n')
    return path


def test_paths_live_in_the_work_folder():
    part, rejects, result = unit_paths(7)
    assert (part, rejects, result) == (
        ".engine/parts/unit-000007.arrow",
        ".engine/parts/unit-000007.rejects.jsonl",
        ".engine/parts/unit-000007.json",
    )
    assert all(
        p.startswith(WORK_DIR + "/")
        for p in (RUN_FILE, workdir.TMP_DIR, workdir.EDITS_DIR, workdir.RETRY_MANIFEST)
    )


# ---- the run's fingerprint ----------------------------------------------------------------------


def test_a_resumed_run_keeps_the_recorded_unit_size(tmp_path, manifest):
    store = Store(str(tmp_path / "out"))
    prepare_out(store, overwrite=False, resume=False)
    opts = _opts(tmp_path / "out", manifest)
    assert run_state(store, opts, TASK, "abc", unit_rows=64) == 64
    recorded = orjson.loads(store.read_bytes(RUN_FILE))
    assert recorded == {"fingerprint": run_fingerprint(opts, TASK, "abc"), "unit_rows": 64}
    # more workers would plan other units; the resumed run keeps the recorded size
    assert (
        run_state(store, _opts(tmp_path / "out", manifest, workers=7, quiet=True), TASK, "abc", unit_rows=16)
        == 64
    )


def test_a_fingerprint_mismatch_names_what_differs(tmp_path, manifest):
    store = Store(str(tmp_path / "out"))
    prepare_out(store, overwrite=False, resume=False)
    run_state(store, _opts(tmp_path / "out", manifest), TASK, "abc", unit_rows=64)
    changed = _opts(tmp_path / "out", manifest, image=ImageOptions(max_size=512), split="validation")
    with pytest.raises(UsageError) as err:
        run_state(store, changed, None, "def", unit_rows=64)
    message = str(err.value)
    assert message.startswith("cannot resume: this run differs from the interrupted one in ")
    named = message.split(" in ", 1)[1].split(";")[0].split(", ")
    assert named == ["config_sha256", "manifest_sha256", "options.image.max_size", "options.split"]
    assert "\n" not in message
    # options that decide nothing in the output may change: fetch timeouts, workers, the image bound
    loose = _opts(tmp_path / "out", manifest, workers=3, image=ImageOptions(timeout=99.0))
    assert run_state(store, loose, TASK, "abc", unit_rows=8) == 64


def test_the_fingerprint_hashes_the_config_bytes(tmp_path, manifest):
    opts = _opts(tmp_path / "out", manifest)
    doc = run_fingerprint(opts, TASK, "abc")
    assert doc["config_sha256"] == hashlib.sha256(TASK.raw).hexdigest()
    assert doc["manifest_sha256"] == "abc"
    assert run_fingerprint(opts, None, "abc")["config_sha256"] is None
    assert doc["options"] == orjson.loads(orjson.dumps(opts.output_defining()))  # JSON round-tripped


def _finished(tmp_path: Path, manifest: Path, **stats) -> Store:
    store = Store(str(tmp_path / "out"))
    store.make_dirs("")
    store.write_bytes("stats.json", orjson.dumps(stats))
    return store


def test_resuming_a_finished_dataset_checks_it_is_the_same_one(tmp_path, manifest):
    opts = _opts(tmp_path / "out", manifest, resume=True)
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    fingerprint = run_fingerprint(opts, TASK, digest)
    moved = {**fingerprint, "options": {**fingerprint["options"], "out": "/elsewhere"}}
    store = _finished(tmp_path, manifest, fingerprint=moved, num_written=1)
    assert check_finished_matches(store, opts, TASK)["num_written"] == 1  # moved: still the same dataset
    with pytest.raises(UsageError, match=r"made with a different options\.layout; use --overwrite"):
        check_finished_matches(store, _opts(tmp_path / "out", manifest, layout="arrow"), TASK)
    manifest.write_bytes(manifest.read_bytes() + b'{"image_id": "b", "image": "b.jpg", "output": "{}"}\n')
    with pytest.raises(UsageError, match=r"made with a different manifest_sha256;"):
        check_finished_matches(store, opts, TASK)


def test_a_finished_dataset_from_before_fingerprints_is_judged_by_its_options(tmp_path, manifest):
    opts = _opts(tmp_path / "out", manifest)
    old_options = opts.to_dict()
    del old_options["image"]["formats"]  # an option that engine did not have yet
    store = _finished(tmp_path, manifest, options=old_options)
    with pytest.raises(UsageError, match=r"a different options\.image\.formats;"):
        check_finished_matches(store, opts, TASK)
    store = _finished(tmp_path, manifest, options=opts.to_dict())
    check_finished_matches(store, opts, TASK)


# ---- unit checkpoints -----------------------------------------------------------------------------


def _complete_unit(store: Store, index: int, rejects: bytes | None = None) -> UnitResult:
    """The files a completed unit leaves: its part, its rejects (if any), and last its checkpoint."""
    part, rejects_path, result_path = unit_paths(index)
    store.write_bytes(part, b"PART" * 100)
    if rejects is not None:
        store.write_bytes(rejects_path, rejects)
    result = UnitResult(
        index=index,
        num_rows=3,
        num_written=2,
        num_passthrough=1,
        rejected={"decode": 1},
        meta_keys=("shop",),
        text_columns=(),
        sizes={"train": np.array([10, 20], np.int64)},
        part=part,
        rejects=rejects_path if rejects is not None else None,
        seconds=0.5,
        part_bytes=400,
        rejects_bytes=len(rejects) if rejects is not None else None,
        warnings={"exif_unreadable": 1},
    )
    store.write_bytes(result_path, result.to_json())
    return result


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store(str(tmp_path / "out"))
    prepare_out(store, overwrite=False, resume=False)
    return store


def test_a_complete_unit_is_trusted_as_it_was_recorded(store):
    recorded = _complete_unit(store, 3, rejects=b'{"line": 2}\n')
    done = load_unit_result(store, 3)
    assert done is not None
    assert (done.index, done.num_rows, done.num_written, done.rejected) == (3, 3, 2, {"decode": 1})
    assert done.meta_keys == ("shop",) and isinstance(done.meta_keys, tuple)
    assert done.sizes["train"].dtype == np.int64 and done.sizes["train"].tolist() == [10, 20]
    assert done.warnings == recorded.warnings and done.rejects_bytes == 12
    assert load_unit_result(store, 4) is None  # never started


@pytest.mark.parametrize(
    "torn", [b"", b'{"index": 3, "num_rows": 3', b"{}", b'{"index": 3}', b"\x00\x00\x00"]
)
def test_a_torn_checkpoint_redoes_its_unit(store, torn, caplog):
    _complete_unit(store, 3)
    store.write_bytes(unit_paths(3)[2], torn)
    with caplog.at_level(logging.WARNING, logger="engine.workdir"):
        assert load_unit_result(store, 3) is None
    assert "unit 3: unreadable checkpoint; redoing the unit" in caplog.text


def test_a_missing_part_redoes_its_unit(store, caplog):
    _complete_unit(store, 5)
    store.remove(unit_paths(5)[0])
    with caplog.at_level(logging.WARNING, logger="engine.workdir"):
        assert load_unit_result(store, 5) is None
    assert "unit 5: .engine/parts/unit-000005.arrow missing or not the recorded size" in caplog.text


def test_a_missing_rejects_file_redoes_its_unit(store):
    _complete_unit(store, 5, rejects=b'{"line": 1}\n')
    store.remove(unit_paths(5)[1])
    assert load_unit_result(store, 5) is None


@pytest.mark.parametrize("which", [0, 1])
def test_a_short_file_redoes_its_unit(store, which):
    """After a power loss an unsynced part (or rejects file) may come back shorter than recorded."""
    _complete_unit(store, 6, rejects=b'{"line": 1}\n{"line": 2}\n')
    path = Path(store.path(unit_paths(6)[which]))
    path.write_bytes(path.read_bytes()[:-1])
    assert load_unit_result(store, 6) is None


def test_a_checkpoint_without_recorded_sizes_is_not_trusted(store):
    result = _complete_unit(store, 2)
    doc = orjson.loads(result.to_json())
    doc["part_bytes"] = None  # what an older engine wrote
    store.write_bytes(unit_paths(2)[2], orjson.dumps(doc))
    assert load_unit_result(store, 2) is None


# ---- the output folder ----------------------------------------------------------------------------


def test_resume_without_a_work_folder_is_a_usage_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        UsageError, match=r"^cannot resume: .* holds no interrupted run \(no \.engine/ folder\)$"
    ):
        prepare_out(Store(str(out)), overwrite=False, resume=True)
    assert (out / "notes.txt").read_text() == "mine"  # nothing removed
    with pytest.raises(UsageError, match="is not empty; pass --overwrite"):
        prepare_out(Store(str(out)), overwrite=False, resume=False)


def test_resume_into_an_empty_or_new_folder_starts_a_run(tmp_path):
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        prepare_out(Store(str(out)), overwrite=False, resume=True)
        assert (out / ".engine" / "parts").is_dir()


def test_resume_keeps_the_work_folder_and_overwrite_clears_everything(tmp_path):
    store = Store(str(tmp_path / "out"))
    prepare_out(store, overwrite=False, resume=False)
    _complete_unit(store, 0)
    prepare_out(store, overwrite=False, resume=True)
    assert load_unit_result(store, 0) is not None
    (tmp_path / "out" / "README.md").write_text("old card")
    prepare_out(store, overwrite=True, resume=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".engine"]
    assert load_unit_result(store, 0) is None


def test_an_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(UsageError, match=r"exists and is not a folder"):
        prepare_out(Store(str(tmp_path / "out")), overwrite=True, resume=False)


def test_finished_means_stats_json_and_no_work_folder(tmp_path):
    store = Store(str(tmp_path / "out"))
    assert not is_finished(store)  # nothing there
    prepare_out(store, overwrite=False, resume=False)
    assert not is_finished(store) and workdir.in_progress(store)
    store.write_bytes("stats.json", b"{}")
    assert not is_finished(store)  # stats.json written, the work folder not yet removed: a crash in between
    workdir.remove(store)
    assert is_finished(store) and not workdir.in_progress(store)
    store.remove("stats.json")
    store.make_dirs("stats.json")  # a folder by that name is not a commit marker
    assert not is_finished(store)
