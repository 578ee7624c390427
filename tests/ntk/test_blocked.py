import numpy as np
import pytest

from freeshap_dq import InputError, KernelProblem
from freeshap_dq.kernels.folder import KernelFolderWriter
from freeshap_dq.ntk.adapters import EncoderHead
from freeshap_dq.ntk.blocked import auto_example_block, compute_ntk_blocks
from freeshap_dq.ntk.compute import compute_ntk
from freeshap_dq.ntk.models import load_model_and_tokenizer

TEXTS = ["a great movie", "a boring film and a dull plot that goes on", "it was bad", "very good indeed",
         "the actors are funny", "terrible", "i loved every minute of it", "long and tedious", "a mess",
         "clever and moving"]


@pytest.fixture(scope="module")
def adapter(tiny_bert_path):
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_bert_path), "encoder")
    return EncoderHead(model, tokenizer, n_classes=2, head_seed=2)


@pytest.mark.parametrize("gradients", ["factors", "vmap"])
@pytest.mark.parametrize("trainable, kernel, block, memory", [
    ("top:2", "class0", 3, "256MiB"),  # blocks 0-3, 3-6, 6-7 | test 7-10
    ("all", "sum", 4, "256MiB"),  # the word table's sparse share, block against block
    ("freeze:1", "class0", 2, "200KiB"),  # several parameter chunks per block (besides the factors' room)
])
def test_blocks_give_the_one_pass_kernel(adapter, trainable, kernel, block, memory, gradients):
    ex = adapter.tokenize(TEXTS)
    train, test = ex[:7], ex[7:]
    whole = compute_ntk(adapter, train, test, trainable=trainable, kernel=kernel, max_memory="256MiB", progress=False,
                        gradients="vmap")
    k_train, k_test = np.full((7, 7), np.nan), np.full((3, 7), np.nan)

    def run(memory):
        k_train[:], k_test[:] = np.nan, np.nan
        return compute_ntk_blocks(adapter, train, test, k_train, k_test, trainable=trainable, kernel=kernel,
                                  max_memory=memory, example_block=block, progress=False, gradients=gradients)

    info = run(memory if gradients == "vmap" else 2**18 * 1024 + 1)  # first learn the factors' room
    info = run(_budget(memory) + info["factor_bytes"])
    assert info["example_block"] == block and info["n_trainable"] == whole.n_trainable
    assert info["gradients"] == gradients and (info["factor_bytes"] > 0) == (gradients == "factors")
    if memory == "200KiB":
        assert info["chunks"] > 1
    scale = np.abs(whole.k_train).max()
    np.testing.assert_allclose(k_train, whole.k_train, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(k_test, whole.k_test, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_array_equal(k_train, k_train.T)


def _budget(spec: str) -> int:
    from freeshap_dq.ntk.setup import parse_memory

    return parse_memory(spec)


def test_blocks_fill_a_memory_mapped_kernel_folder(adapter, tmp_path):
    ex = adapter.tokenize(TEXTS)
    with KernelFolderWriter(tmp_path / "K.kernel", 6, 4) as writer:
        compute_ntk_blocks(adapter, ex[:6], ex[6:], writer.k_train, writer.k_test, trainable="top:1",
                           max_memory="64MiB", example_block=4, progress=False)
        writer.finish([0, 1, 0, 1, 1, 0], [0, 1, 1, 0], ("neg", "pos"))
    problem = KernelProblem.load(tmp_path / "K.kernel")
    assert problem.on_disk and problem.k_train.shape == (6, 6)
    whole = compute_ntk(adapter, ex[:6], ex[6:], trainable="top:1", max_memory="64MiB", progress=False)
    np.testing.assert_allclose(problem.k_test, whole.k_test, rtol=1e-5, atol=1e-6 * np.abs(whole.k_train).max())


def test_auto_block_and_budget_errors(adapter):
    assert auto_example_block(1000, 800, 2**30) == 1000  # 6.4 MB Gram: one block
    assert auto_example_block(100_000, 90_000, 4 * 2**30) == 1491  # a 1 GiB panel of 90,000 fp64 columns
    ex = adapter.tokenize(TEXTS)
    with pytest.raises(InputError, match="too small for example blocks of 5.*--example-block"):
        compute_ntk_blocks(adapter, ex[:7], ex[7:], np.zeros((7, 7)), np.zeros((3, 7)), trainable="all",
                           max_memory="10KiB", example_block=5, progress=False)


def test_an_interrupted_kernel_folder_resumes_from_its_finished_blocks(adapter, tmp_path):
    ex = adapter.tokenize(TEXTS)
    train, test = ex[:7], ex[7:]
    key = {"model": "tiny", "example_block": 2}
    reference = np.full((7, 7), np.nan), np.full((3, 7), np.nan)
    compute_ntk_blocks(adapter, train, test, *reference, trainable="top:1", max_memory="64MiB", example_block=2,
                       progress=False)
    calls = []

    def interrupt_after_two(lo, hi):
        calls.append((lo, hi))
        writer.mark_done(lo, hi)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with KernelFolderWriter(tmp_path / "K.kernel", 7, 3, resume_key=key) as writer:
            compute_ntk_blocks(adapter, train, test, writer.k_train, writer.k_test, trainable="top:1",
                               max_memory="64MiB", example_block=2, progress=False, on_block_done=interrupt_after_two)
    assert not (tmp_path / "K.kernel").exists() and (tmp_path / ".K.kernel.partial").is_dir()
    seen = []
    with KernelFolderWriter(tmp_path / "K.kernel", 7, 3, resume_key=key) as writer:
        assert writer.resumed and writer.done == set(calls)
        info = compute_ntk_blocks(adapter, train, test, writer.k_train, writer.k_test, trainable="top:1",
                                  max_memory="64MiB", example_block=2, progress=False, done=writer.done,
                                  on_block_done=lambda lo, hi: seen.append((lo, hi)) or writer.mark_done(lo, hi))
        writer.finish([0, 1] * 3 + [0], [0, 1, 0])
    assert info["blocks_resumed"] == 2 and not set(seen) & set(calls) and len(seen) + 2 == info["blocks"]
    problem = KernelProblem.load(tmp_path / "K.kernel")
    np.testing.assert_array_equal(problem.k_train, reference[0])
    np.testing.assert_array_equal(problem.k_test, reference[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["K.kernel"]
    assert not (tmp_path / "K.kernel" / "done").exists()
    with pytest.raises(KeyboardInterrupt):
        with KernelFolderWriter(tmp_path / "K2.kernel", 7, 3, resume_key=key) as writer:
            writer.mark_done(0, 2)
            raise KeyboardInterrupt
    with KernelFolderWriter(tmp_path / "K2.kernel", 7, 3, resume_key={**key, "example_block": 3}) as writer:
        assert not writer.resumed and writer.done == set()  # other settings: started over
        writer.k_train[:], writer.k_test[:] = reference  # (an all-zero kernel is refused when the folder closes)
        writer.finish([0, 1] * 3 + [0], [0, 1, 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["K.kernel", "K2.kernel"]


@pytest.mark.parametrize("gradients", ["factors", "vmap"])
@pytest.mark.parametrize("trainable, kernel, block, memory", [
    ("top:2", "class0", 3, "256MiB"),
    ("all", "sum", 4, "256MiB"),  # the word table's sparse share against the landmarks
    ("freeze:1", "class0", 2, "200KiB"),  # several parameter chunks (besides the factors' room)
])
def test_landmark_columns_and_diagonal_equal_the_full_kernel(adapter, trainable, kernel, block, memory, gradients):
    from freeshap_dq.ntk.blocked import compute_ntk_landmarks

    ex = adapter.tokenize(TEXTS)
    train, test = ex[:7], ex[7:]
    whole = compute_ntk(adapter, train, test, trainable=trainable, kernel=kernel, max_memory="256MiB", progress=False,
                        gradients="vmap")
    landmarks = [1, 4, 6]
    cols, test_cols, diag = np.full((7, 3), np.nan), np.full((3, 3), np.nan), np.full(7, np.nan)

    def run(memory):
        cols[:], test_cols[:], diag[:] = np.nan, np.nan, np.nan
        return compute_ntk_landmarks(adapter, train, test, landmarks, cols, test_cols, diag, trainable=trainable,
                                     kernel=kernel, max_memory=memory, example_block=block, progress=False,
                                     gradients=gradients)

    info = run(memory if gradients == "vmap" else 2**18 * 1024 + 1)  # first learn the factors' room
    info = run(_budget(memory) + info["factor_bytes"])
    assert info["landmarks"] == 3 and (memory != "200KiB" or info["chunks"] > 1) and info["gradients"] == gradients
    scale = np.abs(whole.k_train).max()
    np.testing.assert_allclose(cols, whole.k_train[:, landmarks], rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(test_cols, whole.k_test[:, landmarks], rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(diag, np.diag(whole.k_train), rtol=1e-5, atol=1e-6 * scale)
    with pytest.raises(InputError, match="distinct sorted training indices"):
        compute_ntk_landmarks(adapter, train, test, [4, 1], cols, test_cols, diag, trainable=trainable, progress=False)


def test_blocks_and_landmarks_group_the_chunks_when_factors_exceed_their_share(adapter, monkeypatch):
    from freeshap_dq.ntk import setup as compute
    from freeshap_dq.ntk.blocked import compute_ntk_landmarks

    ex = adapter.tokenize(TEXTS)
    train, test = ex[:7], ex[7:]
    whole = compute_ntk(adapter, train, test, trainable="all", kernel="sum", max_memory="256MiB", progress=False,
                        gradients="vmap")
    scale = np.abs(whole.k_train).max()
    k_train, k_test = np.full((7, 7), np.nan), np.full((3, 7), np.nan)
    cols, test_cols, diag = np.full((7, 3), np.nan), np.full((3, 3), np.nan), np.full(7, np.nan)
    common = dict(trainable="all", kernel="sum", example_block=3, progress=False)
    every = compute_ntk_blocks(adapter, train, test, k_train, k_test, max_memory="256MiB", gradients="factors",
                               **common)["factor_bytes"]  # all the factors of two blocks
    budget = 200 * 1024 + int(0.4 * every)  # room for 40% of them beside a budget that needs several chunks
    monkeypatch.setattr(compute, "FACTOR_SHARE", 0.4 * every / budget)
    k_train[:], k_test[:] = np.nan, np.nan
    info = compute_ntk_blocks(adapter, train, test, k_train, k_test, max_memory=budget, **common)
    assert info["gradients"] == "factors" and info["factor_passes"] >= 2 and info["chunks"] > 2
    assert info["factor_bytes"] <= 0.4 * every + 1
    np.testing.assert_allclose(k_train, whole.k_train, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(k_test, whole.k_test, rtol=1e-5, atol=1e-6 * scale)
    info = compute_ntk_landmarks(adapter, train, test, [1, 4, 6], cols, test_cols, diag, max_memory=budget, **common)
    assert info["gradients"] == "factors" and info["factor_passes"] >= 2 and info["chunks"] > 2
    np.testing.assert_allclose(cols, whole.k_train[:, [1, 4, 6]], rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(test_cols, whole.k_test[:, [1, 4, 6]], rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(diag, np.diag(whole.k_train), rtol=1e-5, atol=1e-6 * scale)
