import json

import numpy as np
import pytest
from problems import random_problem

from freeshap_dq import KernelError, KernelProblem, ValuationConfig
from freeshap_dq.kernels import problem as kernel
from freeshap_dq.kernels.folder import KernelFolderWriter, save_kernel_folder
from freeshap_dq.valuation.run import compute_values


def named_problem():
    p = random_problem(n=12, m=6)
    return KernelProblem(p.k_train, p.k_test, p.y_train, p.y_test, ("neg", "neu", "pos"),
                         np.array([f"t{i}" for i in range(12)]), np.arange(6))


def test_folder_roundtrip_stays_on_disk_and_values_match(tmp_path):
    problem = named_problem()
    save_kernel_folder(problem, tmp_path / "K.kernel", manifest={"model": "tiny"})
    loaded = KernelProblem.load(tmp_path / "K.kernel")
    assert loaded.on_disk and not problem.on_disk
    assert loaded.label_names == problem.label_names
    np.testing.assert_array_equal(loaded.train_ids, problem.train_ids)
    assert loaded.fingerprint() == problem.fingerprint()
    config = ValuationConfig(permutations=4, seed=3)
    a, b = compute_values(problem, config, progress=False), compute_values(loaded, config, progress=False)
    np.testing.assert_array_equal(a.values("ce"), b.values("ce"))
    assert json.loads((tmp_path / "K.kernel" / "kernel.json").read_text())["manifest"] == {"model": "tiny"}


def test_fingerprint_reads_in_blocks_with_the_same_digest(monkeypatch):
    problem = random_problem(n=30, m=7)
    whole = problem.fingerprint()
    monkeypatch.setattr(kernel, "BLOCK_BYTES", 8 * 30 * 4)  # 4 rows at a time
    assert KernelProblem(problem.k_train, problem.k_test, problem.y_train, problem.y_test).fingerprint() == whole


def write_folder(path, k_train, k_test, y_train, y_test):
    with KernelFolderWriter(path, len(y_train), len(y_test)) as writer:
        writer.k_train[:] = k_train
        writer.k_test[:] = k_test
        writer.finish(y_train, y_test)


def test_folder_validation_checks_every_block_when_written(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel, "BLOCK_BYTES", 8 * 12 * 2)
    p = random_problem(n=12, m=6)
    k = p.k_train.copy()
    k[9, 2] += 0.5
    with pytest.raises(KernelError, match=r"K\.asym: k_train is not symmetric: \|K\[(9,2|2,9)\]"):
        write_folder(tmp_path / "K.asym", k, p.k_test, p.y_train, p.y_test)
    k_test = p.k_test.copy()
    k_test[5, 11] = np.inf
    with pytest.raises(KernelError, match=r"k_test has 1 non-finite entries \(first at \[5,11\]"):
        write_folder(tmp_path / "K.inf", p.k_train, k_test, p.y_train, p.y_test)
    assert list(tmp_path.iterdir()) == []  # nothing half written


def test_incomplete_or_foreign_folders_are_refused(tmp_path):
    problem = named_problem()
    save_kernel_folder(problem, tmp_path / "K")
    (tmp_path / "K" / "k_test.npy").unlink()
    with pytest.raises(KernelError, match="no k_test.npy; it is incomplete"):
        KernelProblem.load(tmp_path / "K")
    (tmp_path / "other").mkdir()
    with pytest.raises(KernelError, match="without kernel.json is not a kernel folder"):
        KernelProblem.load(tmp_path / "other")
    with pytest.raises(KernelError, match="exists and is not a kernel folder"):
        KernelFolderWriter(tmp_path / "other", 3, 2)


def test_a_failed_write_leaves_the_previous_folder_and_no_temporary(tmp_path):
    problem = named_problem()
    save_kernel_folder(problem, tmp_path / "K")
    with pytest.raises(RuntimeError):
        with KernelFolderWriter(tmp_path / "K", 12, 6) as writer:
            writer.k_train[:5] = 1.0
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["K"]
    assert KernelProblem.load(tmp_path / "K").fingerprint() == problem.fingerprint()
    save_kernel_folder(random_problem(n=12, m=6, seed=4), tmp_path / "K")  # replacing works
    assert KernelProblem.load(tmp_path / "K").fingerprint() == random_problem(n=12, m=6, seed=4).fingerprint()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["K"]


def test_a_verified_folder_loads_without_reading_its_blocks_until_a_file_changes(tmp_path, monkeypatch):
    problem = named_problem()
    save_kernel_folder(problem, tmp_path / "K")
    stored = json.loads((tmp_path / "K" / "kernel.json").read_text())["verified"]["fingerprint"]
    assert stored == problem.fingerprint()
    scans = []
    monkeypatch.setattr(kernel, "row_blocks", lambda *a, **k: scans.append(1) or [])  # any block read is seen
    monkeypatch.setattr(kernel, "_check_symmetric_by_blocks", lambda *a: scans.append(1))
    loaded = KernelProblem.load(tmp_path / "K")
    assert scans == [] and loaded.fingerprint() == stored
    monkeypatch.undo()
    k = np.load(tmp_path / "K" / "k_train.npy")
    k[0, 1] += 1.0  # edited after writing: the stored verdict no longer applies
    np.save(tmp_path / "K" / "k_train.npy", k)
    with pytest.raises(KernelError, match="not symmetric"):
        KernelProblem.load(tmp_path / "K")


def test_an_edit_that_keeps_size_and_mtime_is_still_seen(tmp_path):
    """A kernel folder edited in place with its size and mtime restored was trusted unread."""
    import os

    problem = named_problem()
    save_kernel_folder(problem, tmp_path / "K")
    path = tmp_path / "K" / "k_train.npy"
    before = os.stat(path)
    k = np.load(path)
    k[0, 1] += 1.0
    k[1, 0] += 1.0  # still symmetric: only the fingerprint can tell
    np.save(path, k)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns
    assert KernelProblem.load(tmp_path / "K").fingerprint() != problem.fingerprint()
