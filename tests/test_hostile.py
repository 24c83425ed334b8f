"""Hostile files are bounded everywhere and give the same dataset every time.

The DDS files are fuzz finds from Pillow's own tests (tests/data/hostile/SOURCES.md): 131 bytes
to 22 KB that kept Pillow-SIMD 12.1.1's Python DDS decoder busy for minutes (one of them for
12 s of CPU, then it was written). Stock Pillow 13 rejects them at once. The default --formats
never decodes DDS; these tests widen it so the bound itself is exercised, in the driver's
helper threads, in the local runner's main thread, and in the isolated re-check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import imagegen
import pytest
from conftest import REPO, TESTS, Output, convert, parquet_hashes, row, write_input

from engine.bounds import timeout_reason, transform_isolated
from engine.config import DEFAULT_FORMATS, ImageOptions, parse_formats
from engine.imaging import transform_image

HOSTILE = TESTS / "data" / "hostile"
DDS = sorted(HOSTILE.glob("timeout-*.dds"))
BOUND = 0.5  # seconds of CPU per image
# Wall-time slack on a shared 2-core machine: a starved thread is stopped after the bound plus
# its grace (2 s) and re-checked in a fresh process (start-up, then the bound again).
SLACK = 25.0


def test_hostile_dds_in_driver_threads_is_rejected_within_the_bound():
    """Two helper threads, as the driver runs them, transform every DDS fuzz file at once."""
    code = f"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from engine.bounds import transform_bounded
from engine.config import ImageOptions, parse_formats
opts = ImageOptions(timeout={BOUND}, formats=parse_formats("+dds"))
def one(path):
    started = time.monotonic()
    result = transform_bounded(open(path, "rb").read(), opts)
    return getattr(result, "reason", "written"), time.monotonic() - started
with ThreadPoolExecutor(2, thread_name_prefix="fetch") as pool:
    print(json.dumps(list(pool.map(one, {[str(p) for p in DDS]!r}))))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    outcomes = json.loads(proc.stdout)
    assert [reason for reason, _ in outcomes] == [timeout_reason(BOUND)] * len(DDS), outcomes
    assert all(seconds < BOUND + SLACK for _, seconds in outcomes), outcomes


def test_hostile_dds_memory_is_bounded_by_the_declared_size():
    """Each file in a fresh process, in a helper thread: the peak is the image Pillow allocates
    from the header (4 bytes a pixel and a pointer a row, which --max-pixels bounds) and little
    more, since the bound stops the decoder's own buffers growing."""
    from PIL import Image

    code = """
import resource, sys, threading
from engine.bounds import transform_bounded
from engine.config import ImageOptions, parse_formats
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
opts = ImageOptions(timeout=float(sys.argv[2]), formats=parse_formats("+dds"))
thread = threading.Thread(target=transform_bounded, args=(open(sys.argv[1], "rb").read(), opts))
thread.start()
thread.join()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""
    for path in DDS:
        width, height = Image.open(path).size
        declared = 4 * width * height + 8 * height
        proc = subprocess.run(
            [sys.executable, "-c", code, str(path), str(BOUND)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert int(proc.stdout) < declared + 100 * 2**20, (path.name, int(proc.stdout), declared)


def test_hostile_dds_in_the_local_runner_gives_the_same_dataset_every_run(tmp_path):
    dds = [p for p in DDS if p.stat().st_size < 3000]  # two of them: the loaded run is slow on 2 cores
    images = {p.name: p.read_bytes() for p in dds} | {"good.jpg": imagegen.jpeg()}
    inp = write_input(tmp_path / "in", [row(name, name) for name in images], images)
    runs = []
    for i in range(2):
        # the second run shares the machine with processes that keep every core busy
        burners = [
            subprocess.Popen(
                [sys.executable, "-c", "import time\nend = time.time() + 60\nwhile time.time() < end: pass"]
            )
            for _ in range(2 * i)
        ]
        started = time.monotonic()
        try:
            assert convert(inp, tmp_path / f"out{i}", "--formats", "+dds", "--image-timeout", str(BOUND)) == 0
        finally:
            for burner in burners:
                burner.kill()
                burner.wait()
        assert time.monotonic() - started < len(dds) * (BOUND + SLACK)
        out = Output(tmp_path / f"out{i}")
        assert list(out.by_id()) == ["good.jpg"]
        assert {r["image_id"]: (r["stage"], r["reason"]) for r in out.rejects} == {
            p.name: ("decode", timeout_reason(BOUND)) for p in dds
        }
        runs.append(
            (parquet_hashes(tmp_path / f"out{i}"), (tmp_path / f"out{i}" / "rejects.jsonl").read_bytes())
        )
    assert runs[0] == runs[1]


def test_the_default_formats_never_decode_them():
    opts = ImageOptions(timeout=BOUND)
    assert "dds" not in DEFAULT_FORMATS
    for path in DDS:
        started = time.monotonic()
        reason = transform_image(path.read_bytes(), opts).reason
        assert reason.startswith("DDS image: not in --formats") and time.monotonic() - started < 1.0, reason


def test_the_isolated_recheck_decides_as_the_bound_does():
    """A thread starved of CPU is re-checked in a fresh process with the same CPU bound: there a
    hostile file is rejected with the same reason, and a good one gives the same bytes."""
    opts = ImageOptions(timeout=BOUND, formats=parse_formats("+dds"))
    assert transform_isolated(DDS[0].read_bytes(), opts).reason == timeout_reason(BOUND)
    photo = imagegen.noise_jpeg((1400, 1000))  # downscaled: decoded and re-encoded
    here = transform_image(photo, ImageOptions(timeout=BOUND))
    there = transform_isolated(photo, ImageOptions(timeout=BOUND))
    assert not here.passthrough
    assert (there.data, there.width, there.height, there.passthrough) == (
        here.data,
        here.width,
        here.height,
        False,
    )


def test_a_starved_block_is_stopped_in_wall_time_for_the_recheck():
    """A block that gets no CPU (here it only waits) is stopped once it is past its bound plus
    the grace, with kind "wall": transform_bounded then re-checks it in a fresh process."""
    from engine.bounds import GRACE_SECONDS, ImageTimeout, time_limit

    started = time.monotonic()
    try:
        with time_limit(0.2):
            while time.monotonic() - started < 20:
                time.sleep(0.05)
    except ImageTimeout as exc:
        kind = exc.kind
    waited = time.monotonic() - started
    assert kind == "wall" and 0.2 + GRACE_SECONDS <= waited < 0.2 + GRACE_SECONDS + 5, waited


@pytest.mark.ray
def test_hostile_dds_in_ray_workers(tmp_path, ray_instance):
    """In a Ray worker the transform runs in the worker's main thread: the same bound, the same
    rejects as the local runner."""
    images = {p.name: p.read_bytes() for p in DDS} | {"good.jpg": imagegen.jpeg()}
    inp = write_input(tmp_path / "in", [row(name, name) for name in images], images)
    args = ("--formats", "+dds", "--image-timeout", str(BOUND), "--unit-rows", "1")
    assert convert(inp, tmp_path / "local", *args) == 0
    started = time.monotonic()
    assert convert(inp, tmp_path / "ray", *args, "--workers", "2", runner="ray") == 0
    assert time.monotonic() - started < len(DDS) * (BOUND + SLACK)
    ray_out = Output(tmp_path / "ray")
    on_workers = sum(n for node, n in ray_out.stats["units_by_node"].items() if node != "driver")
    assert on_workers >= len(DDS) - 1, ray_out.stats["units_by_node"]  # one unit may run in the driver first
    assert (tmp_path / "ray" / "rejects.jsonl").read_bytes() == (
        tmp_path / "local" / "rejects.jsonl"
    ).read_bytes()
    assert parquet_hashes(tmp_path / "ray") == parquet_hashes(tmp_path / "local")
