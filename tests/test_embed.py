"""`pcache embed`: mixed folders with broken files, SIGKILL + resume, appends, fingerprint refusal, the CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from prognosis_cache.cache.h5 import read_cache
from prognosis_cache.cache.shards import partial_dir, shard_paths
from prognosis_cache.cli import app
from prognosis_cache.data.manifest import load_manifest
from prognosis_cache.data.synthetic import CohortSpec, make_cohort
from prognosis_cache.embed import embed_manifest
from prognosis_cache.errors import CacheError

TINY = "tiny-dinov2"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort"), CohortSpec(n_patients=14, seed=1, size=64))


def mixed_manifest(cohort: Path, folder: Path) -> Path:
    """The cohort (PNG + DICOM) plus a JPEG, a corrupt PNG, an empty file and a missing file."""
    images = cohort.parent / "images"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(folder / "extra.jpg", quality=90)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (folder / "empty.dcm").write_bytes(b"")
    lines = cohort.read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    for row in rows:
        row["path"] = str(images.parent / row["path"])
    for name in ("extra.jpg", "corrupt.png", "empty.dcm", "missing.png"):
        rows.append(dict.fromkeys(header, "") | {"image_id": name, "path": str(folder / name),
                                                   "patient_id": "px", "center": "center_A", "outcome": "1"})
    out = folder / "mixed.csv"
    out.write_text("\n".join([",".join(header)] + [",".join(r[h] for h in header) for r in rows]) + "\n")
    return out


def test_mixed_folder_embeds_and_lists_failures(cohort, tmp_path):
    manifest = mixed_manifest(cohort, tmp_path)
    result = CliRunner().invoke(app, ["embed", "--manifest", str(manifest), "--backbone", TINY, "--weights",
                                      "random:0", "--out", str(tmp_path / "c.h5"), "--batch-size", "4"])
    assert result.exit_code == 1, result.output  # documented: 1 = cache written, some images failed
    assert isinstance(result.exception, SystemExit), result.exception  # a deliberate exit, not a crash
    assert "Traceback" not in result.output
    cache = read_cache(tmp_path / "c.h5")
    failed = {f.image_id: f.reason for f in cache.failed}
    assert set(failed) == {"corrupt.png", "empty.dcm", "missing.png"}
    assert all(reason for reason in failed.values())
    assert "extra.jpg" in cache.image_id.tolist()
    n_rows = len(manifest.read_text().splitlines()) - 1
    assert len(cache) == n_rows - 3
    assert cache.features.shape[1] == 32 and np.isfinite(cache.features).all()
    assert not partial_dir(tmp_path / "c.h5").exists()
    info = CliRunner().invoke(app, ["cache", "info", str(tmp_path / "c.h5"), "--json"])
    assert info.exit_code == 0, info.output
    described = json.loads(info.output)
    assert described["fingerprint"] == cache.fingerprint and described["images"] == len(cache)
    assert {f["image_id"] for f in described["failures"]} == set(failed) and described["complete"] is False


def test_on_error_fail_stops_with_exit_3(cohort, tmp_path):
    manifest = mixed_manifest(cohort, tmp_path)
    result = CliRunner().invoke(app, ["embed", "--manifest", str(manifest), "--backbone", TINY, "--weights",
                                      "random:0", "--out", str(tmp_path / "c.h5"), "--on-error", "fail"])
    assert result.exit_code == 3 and isinstance(result.exception, SystemExit), result.exception
    assert "manifest row" in result.output and "Traceback" not in result.output


def test_append_new_rows_reuses_old_features(cohort, tmp_path):
    lines = cohort.read_text().splitlines()
    half = tmp_path / "half.csv"
    half.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    root = cohort.parent
    r1 = embed_manifest(load_manifest(half, root), TINY, weights="random:0", out=tmp_path / "c.h5", batch_size=4)
    before = read_cache(tmp_path / "c.h5")
    r2 = embed_manifest(load_manifest(cohort), TINY, weights="random:0", out=tmp_path / "c.h5", batch_size=4)
    after = read_cache(tmp_path / "c.h5")
    assert r1.n_new == len(before) and r2.n_reused == len(before)
    assert r2.n_new == len(lines) - 1 - len(before)
    np.testing.assert_array_equal(after.features[: len(before)], before.features)
    assert after.image_id.tolist()[: len(before)] == before.image_id.tolist()
    with pytest.raises(CacheError, match="appending would mix"):
        embed_manifest(load_manifest(cohort), TINY, weights="random:1", out=tmp_path / "c.h5")


def run_cli(*args: str) -> subprocess.Popen:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "prognosis_cache", "embed", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    # resnet18 at 224 px is slow enough on CPU to be caught mid-run, fast enough for a test.
    manifest = make_cohort(tmp_path / "cohort", CohortSpec(n_patients=40, seed=3, size=96, dicom_share=0.3))
    n = len(manifest.read_text().splitlines()) - 1
    common = ["--manifest", str(manifest), "--backbone", "resnet18", "--weights", "random:0", "--batch-size", "4"]
    killed = tmp_path / "killed.h5"
    proc = run_cli(*common, "--out", str(killed))
    deadline = time.monotonic() + 120
    while len(shard_paths(partial_dir(killed))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "embed finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(shard_paths(partial_dir(killed)))
    assert committed >= 3 and not killed.exists()

    resumed = embed_manifest(load_manifest(manifest), "resnet18", weights="random:0", out=killed, batch_size=4)
    assert resumed.n_reused >= 4 * 3  # committed shards were not recomputed
    assert resumed.n_reused + resumed.n_new == n
    straight = embed_manifest(load_manifest(manifest), "resnet18", weights="random:0", out=tmp_path / "s.h5",
                              batch_size=4)
    a, b = read_cache(killed, dtype=np.float16), read_cache(tmp_path / "s.h5", dtype=np.float16)
    assert a.image_id.tolist() == b.image_id.tolist()
    assert a.fingerprint == b.fingerprint
    assert a.features.tobytes() == b.features.tobytes()
    assert straight.n_new == n


def test_worker_processes_give_identical_features(cohort, tmp_path):
    """Decoding in 2 worker processes (the GPU-feeding setup) must not change a single bit, nor the row order."""
    manifest = load_manifest(cohort)
    serial = embed_manifest(manifest, TINY, weights="random:0", out=tmp_path / "a.h5", batch_size=4, workers=0)
    parallel = embed_manifest(manifest, TINY, weights="random:0", out=tmp_path / "b.h5", batch_size=4, workers=2)
    a, b = read_cache(serial.path, dtype=np.float16), read_cache(parallel.path, dtype=np.float16)
    assert a.image_id.tolist() == b.image_id.tolist() == manifest.frame["image_id"].to_list()
    assert a.features.tobytes() == b.features.tobytes()
