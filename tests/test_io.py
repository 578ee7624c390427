from freeshap_dq.io import available_memory


def test_available_memory_counts_the_reclaimable_page_cache(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:          500000 kB\nMemAvailable:   20000000 kB\n")
    assert available_memory(meminfo) == 20000000 * 1024  # not MemFree: a kernel folder just written is cache


def test_available_memory_falls_back_to_the_free_pages(tmp_path):
    import os

    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert abs(available_memory(tmp_path / "missing") - free) < 2**30
    assert available_memory() > 0


def test_wrong_files_are_named_for_what_they_are_and_never_suggest_unpickling(tmp_path):
    """A CSV given as --result, or a corrupt .npy, was reported as 'contains pickled data ... allow_pickle='."""
    import numpy as np
    import pytest
    from click.testing import CliRunner
    from problems import random_problem

    from freeshap_dq import CheckpointError, KernelError, KernelProblem, ValuationResult
    from freeshap_dq.cli.main import cli
    from freeshap_dq.kernels.folder import save_kernel_folder

    (tmp_path / "values.csv").write_text("train_index,value\n0,0.1\n")
    with pytest.raises(CheckpointError, match="it is a text file.*'train_index,value'.*a values table is not a result"):
        ValuationResult.load(tmp_path / "values.csv")
    res = CliRunner().invoke(cli, ["report", "--result", str(tmp_path / "values.csv")])
    assert res.exit_code == 2 and "not a freeshap-dq result" in res.output
    np.savez(tmp_path / "objects.npz", manifest=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="holds Python objects"):
        ValuationResult.load(tmp_path / "objects.npz")
    np.savez(tmp_path / "K.npz", k_train=np.eye(2), k_test=np.ones((1, 2)), y_train=np.array([0, 1]),
             y_test=np.array([0]), label_names=np.array([object(), object()], dtype=object))
    with pytest.raises(KernelError, match="holds Python objects"):
        KernelProblem.load(tmp_path / "K.npz")
    save_kernel_folder(random_problem(n=6, m=3), tmp_path / "F.kernel")
    (tmp_path / "F.kernel" / "y_train.npy").write_text("not an array")
    with pytest.raises(KernelError, match="y_train.npy: not a .npy array: it is a text file"):
        KernelProblem.load(tmp_path / "F.kernel")
    messages = []
    for load, path in ((ValuationResult.load, "values.csv"), (ValuationResult.load, "objects.npz"),
                       (KernelProblem.load, "K.npz"), (KernelProblem.load, "F.kernel")):
        with pytest.raises((CheckpointError, KernelError)) as caught:
            load(tmp_path / path)
        messages.append(str(caught.value))
    assert not any("allow_pickle" in m or "unsafe" in m for m in messages), messages


def test_one_blas_thread_limits_blas_inside_and_restores_it():
    from threadpoolctl import threadpool_info

    from freeshap_dq.io import one_blas_thread

    blas = lambda: [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]  # noqa: E731
    before = blas()
    with one_blas_thread():
        assert blas() and set(blas()) == {1}
    assert blas() == before
