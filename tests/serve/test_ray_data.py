"""kiln.ray.map_batches: Ray Data batch inference on two simulated nodes (ray.cluster_utils.Cluster: a head and a
worker, two CPUs each: one for an inference actor, one for the dataset's read tasks). 10,000 generated inputs give the same outputs as a
plain loop over ExecutionContext.execute, in memory, written as Parquet and as .npy; .npy shards and an image
folder feed it through the dataset helpers."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from kiln.errors import KilnError

from .conftest import build, conv_mlp

pytestmark = pytest.mark.xdist_group("ray")  # every Ray test in one xdist worker: one Ray at a time
ray = pytest.importorskip("ray", reason="ray[data] is in the test extra")

ROWS = 10_000


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    d = tmp_path_factory.mktemp("raydata")
    return build(conv_mlp(64, seed=5), str(d / "tiny.kiln"), {"x": ((1, 3, 16, 16), (32, 3, 16, 16), (64, 3, 16, 16))})


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    # 3 logical CPUs a node: an actor asking 2 fits once per node (so two actors must spread over both nodes,
    # whatever Ray's placement prefers), and 1 is left on each for Ray Data's read and map tasks
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
    c.add_node(num_cpus=3)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def data(plan):
    """(inputs [ROWS, 3, 16, 16], outputs of a plain loop over execute, 50 rows a call)."""
    from kiln.runtime.engine import Engine
    x = np.random.default_rng().standard_normal((ROWS, 3, 16, 16)).astype(np.float32)
    ctx = Engine.load(plan).create_execution_context()
    y = np.concatenate([ctx.execute({"x": x[i:i + 50]})["y"] for i in range(0, ROWS, 50)])
    return x, y


def _with_ids(x: np.ndarray) -> "ray.data.Dataset":
    ref = ray.put(x)

    def attach(batch: dict, xref=ref) -> dict:
        return {"id": batch["id"], "x": ray.get(xref)[batch["id"]]}
    return ray.data.range(len(x), override_num_blocks=8).map_batches(attach, batch_format="numpy")


def test_map_batches_two_nodes_equals_execute_loop(cluster, plan, data, tmp_path):
    """Written as Parquet with the ids passed through; the returned Dataset is read in test_image_folder."""
    import kiln.ray
    x, y = data
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    written = kiln.ray.map_batches(plan, _with_ids(x), output=str(tmp_path / "pq"), format="parquet", concurrency=2,
                                   num_cpus=2)  # one actor per node (see `cluster`): SPREAD is only a preference
    import pyarrow.parquet as pq
    files = sorted(glob.glob(os.path.join(written[0], "*.parquet")))
    assert files
    ids, ys = [], []
    for f in files:
        t = pq.read_table(f)
        assert set(t.column_names) == {"id", "y"}  # the input column consumed, the ids passed through
        ids.append(t.column("id").to_numpy())
        ys.append(np.stack(t.column("y").to_numpy(zero_copy_only=False)))
    ids_all = np.concatenate(ids)
    assert np.array_equal(np.sort(ids_all), np.arange(ROWS))
    got = np.concatenate(ys)[np.argsort(ids_all)]
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)
    from ray._private.state import actors  # GCS records, kept after the pool's actors exit
    nodes = {a["Address"]["NodeID"] for a in actors().values() if "PlanPredictor" in a.get("ActorClassName", "")}
    assert len(nodes) == 2, nodes  # one Engine per actor, the actors on both nodes
    print(f"\nRay Data, {ROWS} rows on 2 nodes: max |map_batches - execute loop| = {np.abs(got - y).max():.3g}")


def test_npy_shards_in_npy_out(cluster, plan, data, tmp_path):
    import kiln.ray
    x, y = data
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, part in enumerate(np.array_split(x[:2000], 4)):
        np.save(shards / f"part{k}.npy", part)
    ds = kiln.ray.npy_dataset(str(shards), input_name="x")
    written = kiln.ray.map_batches(plan, ds, output=str(tmp_path / "npy"), format="npy", batch_size=50)
    assert written == [str(tmp_path / "npy" / "y")]
    got = np.concatenate([np.load(f) for f in sorted(glob.glob(os.path.join(written[0], "*.npy")))])
    assert got.shape == (2000, 10)
    order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731  shards' order across files is Ray's: compare as sets
    np.testing.assert_allclose(order(got), order(y[:2000]), rtol=1e-5, atol=1e-5)


def test_image_folder(cluster, plan, tmp_path):
    from PIL import Image

    import kiln.ray
    from kiln.quant.images import Preprocess
    from kiln.runtime.engine import Engine
    rng = np.random.default_rng()
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (20 + k, 24, 3), dtype=np.uint8)).save(folder / f"im{k}.png")
    ds = kiln.ray.image_dataset(str(folder), plan, preprocess="resize=16,16")
    rows = kiln.ray.map_batches(plan, ds).take_all()
    assert len(rows) == 6
    ctx = Engine.load(plan).create_execution_context()
    pre = Preprocess.parse("resize=16,16")
    spec = type("V", (), {"name": "x", "type": type("T", (), {"shape": ["N", 3, 16, 16]})})
    for r in rows:
        with Image.open(r["path"]) as img:
            want = ctx.execute({"x": pre.apply(img, spec)})["y"][0]
        np.testing.assert_allclose(r["y"], want, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_one_line(cluster, plan, data):
    import kiln.ray
    ds = ray.data.from_items([{"a": 1.0}, {"a": 2.0}]).map(lambda r: {"a": r["a"], "b": r["a"]})
    with pytest.raises(KilnError, match=r"no column for input 'x' \(columns: a, b\)"):
        kiln.ray.map_batches(plan, ds)
    with pytest.raises(KilnError, match="format must be one of npy, parquet"):
        kiln.ray.map_batches(plan, ds, format="csv")
    with pytest.raises(KilnError, match="plan file not found"):
        kiln.ray.map_batches(os.path.join(os.path.dirname(plan), "missing.kiln"), ds)
