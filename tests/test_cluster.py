"""A real multi-node Ray cluster on this machine: a head and two worker nodes, each with its own
raylet (``ray.cluster_utils.Cluster``). The engine joins it with --ray-address; shards must be
produced on more than one node, byte-identical to a single-process run, and losing a worker node
mid-run must still finish the job with nothing lost or duplicated."""

from __future__ import annotations

import threading
import time

import imagegen
import pytest
from conftest import Output, convert, parquet_hashes, row, write_input

pytestmark = [pytest.mark.ray, pytest.mark.slow]
NUM = 48


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head only schedules
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def cluster_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-in")
    images, rows = {}, []
    for i in range(NUM):
        images[f"img/{i}.jpg"] = imagegen.encode(
            imagegen.stored_for_orientation(imagegen.quadrant_image((800, 600)), 8), "JPEG", orientation=8
        )
        rows.append(row(f"id{i}", f"img/{i}.jpg"))
    rows.append(row("id3", "img/3.jpg"))
    inp = write_input(root, rows, images)
    reference = root / "reference"
    assert convert(inp, reference, "--max-size", "300", "--shard-rows", "10") == 0  # in-process
    return inp, reference


def test_conversion_on_a_three_node_cluster(cluster, cluster_input, tmp_path):
    c, _ = cluster
    inp, reference = cluster_input
    out = tmp_path / "out"
    assert (
        convert(
            inp,
            out,
            "--max-size",
            "300",
            "--shard-rows",
            "10",
            "--unit-rows",
            "4",
            "--ray-address",
            c.address,
            runner="ray",
        )
        == 0
    )
    stats = Output(out).stats
    assert len([n for n in stats["units_by_node"] if n != "driver"]) >= 2, stats["units_by_node"]
    assert len([n for n in stats["shards_by_node"] if n != "driver"]) >= 2, stats["shards_by_node"]
    assert parquet_hashes(out) == parquet_hashes(reference) and len(parquet_hashes(out)) == 5
    assert stats["num_input_rows"] == NUM + 1 and stats["num_written"] == NUM


def test_losing_a_worker_node_mid_run_finishes_the_job(cluster, cluster_input, tmp_path):
    c, nodes = cluster
    inp, reference = cluster_input
    out = tmp_path / "out"
    result: dict = {}

    def run():
        result["code"] = convert(
            inp,
            out,
            "--max-size",
            "300",
            "--shard-rows",
            "10",
            "--unit-rows",
            "2",
            "--ray-address",
            c.address,
            runner="ray",
        )

    thread = threading.Thread(target=run)
    thread.start()
    parts = out / ".engine" / "parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (parts.is_dir() and len(list(parts.glob("unit-*.json"))) >= 3):
        time.sleep(0.01)
    c.remove_node(nodes[1])  # kill one worker node's raylet and workers mid-run
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert result["code"] == 0
    assert parquet_hashes(out) == parquet_hashes(reference)
    stats = Output(out).stats
    assert stats["num_input_rows"] == NUM + 1 and stats["num_written"] == NUM
    assert [r["stage"] for r in Output(out).rejects] == ["duplicate"]
