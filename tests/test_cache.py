"""Contract 1: the HDF5 cache round-trips, is readable with plain h5py, and refuses to mix fingerprints."""

import json

import h5py
import numpy as np
import pytest

from prognosis_cache.cache import shards
from prognosis_cache.cache.fingerprint import canonical_json, fingerprint_of
from prognosis_cache.cache.h5 import (
    SCHEMA_VERSION,
    FailedImage,
    read_attrs,
    read_cache,
    require_same_fingerprint,
    write_cache,
)
from prognosis_cache.errors import CacheError


def make(path, *, dim=8, n=5, backbone="b", dtype="float16", seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    fields = {"backbone": {"name": backbone, "dim": dim}, "weights": "random:0", "dtype": dtype}
    write_cache(path, features=feats, image_id=[f"img{i}" for i in range(n)],
                patient_id=[f"pat{i // 2}" for i in range(n)], center=["A", "B"] * (n // 2) + ["A"] * (n % 2),
                labels={"outcome": np.array([0, 1, np.nan, 1, 0][:n], np.float32)}, classes={"outcome": ["0", "1"]},
                fingerprint_json=fields, manifest_sha256="ab" * 32, dataset="demo",
                failed=[FailedImage("bad", "bad.png", "truncated PNG")])
    return feats, fields


def test_round_trip(tmp_path):
    feats, fields = make(tmp_path / "c.h5")
    c = read_cache(tmp_path / "c.h5")
    assert c.features.dtype == np.float32
    np.testing.assert_array_equal(c.features, feats.astype(np.float16).astype(np.float32))
    assert c.image_id.tolist() == [f"img{i}" for i in range(5)]
    assert c.patient_id.tolist()[:3] == ["pat0", "pat0", "pat1"]
    np.testing.assert_array_equal(c.labels["outcome"], [0, 1, np.nan, 1, 0])
    assert c.classes == {"outcome": ["0", "1"]}
    assert c.failed == [FailedImage("bad", "bad.png", "truncated PNG")]
    assert c.fingerprint == fingerprint_of(fields)
    assert c.dataset == "demo" and c.backbone == "b"
    assert read_attrs(tmp_path / "c.h5")["complete"]


def test_plain_h5py_reader_following_the_readme(tmp_path):
    """What the README's schema section promises someone without pcache."""
    feats, fields = make(tmp_path / "c.h5", dtype="float32")
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        x = f["features"][:]
        ids = f["image_id"].asstr()[:]
        y = f["labels/outcome"][:]
        classes = json.loads(f["labels/outcome"].attrs["classes"])
        fp = json.loads(f.attrs["fingerprint_json"])
        assert f.attrs["fingerprint"] == fingerprint_of(fp)
        assert f["failed/reason"].asstr()[0] == "truncated PNG"
    assert x.dtype == np.float32 and x.shape == (5, 8)
    np.testing.assert_array_equal(x, feats)
    assert list(ids) == [f"img{i}" for i in range(5)]
    assert classes == ["0", "1"] and np.isnan(y[2])
    assert fp == json.loads(canonical_json(fields))


def test_mixed_fingerprints_refused(tmp_path):
    make(tmp_path / "a.h5", backbone="a")
    make(tmp_path / "b.h5", backbone="b")
    a, b = read_cache(tmp_path / "a.h5"), read_cache(tmp_path / "b.h5")
    assert require_same_fingerprint([a, a]) == a.fingerprint
    with pytest.raises(CacheError, match="different fingerprints"):
        require_same_fingerprint([a, b])


def test_unreadable_and_wrong_version(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match="not a readable HDF5"):
        read_cache(tmp_path / "junk.h5")
    with pytest.raises(CacheError, match="does not exist"):
        read_cache(tmp_path / "none.h5")
    make(tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(CacheError, match="schema version 99"):
        read_cache(tmp_path / "c.h5")


def test_write_is_atomic_on_error(tmp_path):
    make(tmp_path / "c.h5")
    before = (tmp_path / "c.h5").read_bytes()
    with pytest.raises(ValueError):
        write_cache(tmp_path / "c.h5", features=np.zeros((2, 3)), image_id=["a", "b"], patient_id=["p", "p"],
                    center=["c", "c"], labels={"y": np.zeros(3)}, classes={}, fingerprint_json={},
                    manifest_sha256="", dataset="d")
    assert (tmp_path / "c.h5").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]


def test_shards_round_trip_and_refuse_other_fingerprint(tmp_path):
    folder = shards.open_partial(tmp_path / "c.h5", "f" * 64)
    shards.write_shard(folder, 0, shards.Shard(np.array(["a", "b"]), np.ones((2, 3), np.float16),
                                               np.array(["c"]), np.array(["bad file"])))
    assert shards.next_index(folder) == 1
    (got,) = list(shards.read_shards(folder))
    assert got.image_id.tolist() == ["a", "b"] and got.failed_reason.tolist() == ["bad file"]
    with pytest.raises(CacheError, match="unfinished work"):
        shards.open_partial(tmp_path / "c.h5", "0" * 64)
    (folder / "shard-0000001.npz").write_bytes(b"torn")
    with pytest.raises(CacheError, match="delete that one shard"):
        list(shards.read_shards(folder))
