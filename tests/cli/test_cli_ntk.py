import json

import pandas as pd
import pytest
from click.testing import CliRunner

from freeshap_dq import KernelProblem, ValuationResult
from freeshap_dq.cli.main import cli


@pytest.fixture
def data_files(tmp_path):
    train = pd.DataFrame({"id": [f"r{i}" for i in range(8)],
                          "text": ["a great movie", "a dull plot", "it was great", "it was bad", "very good",
                                   "terrible", "i loved every minute", "long and tedious"],
                          "label": ["pos", "neg"] * 4})
    test = pd.DataFrame({"id": ["t0", "t1", "t2"], "text": ["brilliant", "boring film", "funny"],
                         "label": ["pos", "neg", "pos"]})
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_json(tmp_path / "test.jsonl", orient="records", lines=True)
    return tmp_path / "train.csv", tmp_path / "test.jsonl"


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_kernel_then_value(tmp_path, data_files, tiny_bert_path):
    train, test = data_files
    res = run(["kernel", "--train", train, "--test", test, "--model", tiny_bert_path, "--trainable", "top:1",
               "-o", tmp_path / "K.npz", "--no-progress"])
    assert res.exit_code == 0, res.output
    problem = KernelProblem.load(tmp_path / "K.npz")
    assert json.loads((tmp_path / "K.npz.manifest.json").read_text())["trainable"] == "top:1"
    assert problem.k_train.shape == (8, 8) and list(problem.train_ids[:2]) == ["r0", "r1"]
    res = run(["value", "--kernel", tmp_path / "K.npz", "-o", tmp_path / "v.csv", "--permutations", 4])
    assert res.exit_code == 0, res.output
    assert list(pd.read_csv(tmp_path / "v.csv")["example_id"][:2]) == ["r0", "r1"]


def test_value_from_data_uses_the_cache(tmp_path, data_files, tiny_bert_path):
    train, test = data_files
    args = ["value", "--train", train, "--test", test, "--model", tiny_bert_path, "--trainable", "head-only",
            "--cache-dir", tmp_path / "cache", "--permutations", 3, "-o", tmp_path / "v.parquet",
            "--save-result", tmp_path / "r.npz", "--no-progress"]
    first = run(args)
    assert first.exit_code == 0, first.output
    second = run(args)
    assert second.exit_code == 0 and "using the cached kernel" in second.output
    manifest = ValuationResult.load(tmp_path / "r.npz").manifest
    assert manifest["kernel"]["trainable"] == "head-only" and manifest["kernel"]["train_fingerprint"]
    assert len(pd.read_parquet(tmp_path / "v.parquet")) == 8


def test_the_gradient_path_is_a_choice_recorded_in_the_manifest(tmp_path, data_files, tiny_bert_path):
    train, test = data_files
    kernels = {}
    for path in ("auto", "vmap"):
        res = run(["kernel", "--train", train, "--test", test, "--model", tiny_bert_path, "--trainable", "top:1",
                   "--gradients", path, "-o", tmp_path / f"{path}.npz", "--no-progress"])
        assert res.exit_code == 0, res.output
        manifest = json.loads((tmp_path / f"{path}.npz.manifest.json").read_text())
        assert manifest["gradients"] == ("factors" if path == "auto" else "vmap")
        assert f"per-example gradients by {manifest['gradients']}" in res.output
        kernels[path] = KernelProblem.load(tmp_path / f"{path}.npz").k_train
    scale = abs(kernels["vmap"]).max()
    assert abs(kernels["auto"] - kernels["vmap"]).max() <= 1e-5 * scale
    res = run(["kernel", "--train", train, "--test", test, "--model", tiny_bert_path, "--gradients", "jvp",
               "-o", tmp_path / "x.npz"])
    assert res.exit_code == 2 and "jvp" in res.output and not (tmp_path / "x.npz").exists()


def test_kernel_safetensors_output_has_manifest(tmp_path, data_files, tiny_bert_path):
    train, test = data_files
    res = run(["kernel", "--train", train, "--test", test, "--model", tiny_bert_path, "--trainable", "head-only",
               "-o", tmp_path / "K.safetensors"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "K.json").read_text())
    assert manifest["label_names"] == ["neg", "pos"] and manifest["model_fingerprint"]


@pytest.mark.parametrize("extra, message", [
    (["--text-column", "sentence"], "no column 'sentence'"),
    (["--model", "someone/some-model"], "Hugging Face Hub id"),
    (["--trainable", "top:99"], "layers"),
    (["--max-memory", "1KiB", "--trainable", "all"], "too small"),
])
def test_kernel_errors(tmp_path, data_files, tiny_bert_path, extra, message):
    train, test = data_files
    args = ["kernel", "--train", train, "--test", test, "--model", tiny_bert_path, "-o", tmp_path / "K.npz"]
    res = run(args + extra)
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "K.npz").exists()


def test_value_needs_a_kernel_or_data(tmp_path, data_files):
    res = run(["value", "-o", tmp_path / "v.csv"])
    assert res.exit_code == 2 and "--kernel" in res.output
    res = run(["value", "--kernel", tmp_path / "K.npz", "--train", data_files[0], "-o", tmp_path / "v.csv"])
    assert res.exit_code == 2 and "not both" in res.output


def test_kernel_folder_by_blocks_then_low_rank_value(tmp_path, data_files, tiny_bert_path):
    train, test = data_files
    common = ["--train", train, "--test", test, "--model", tiny_bert_path, "--trainable", "top:1", "--no-progress"]
    res = run(["kernel", *common, "-o", tmp_path / "K.kernel", "--example-block", 3])
    assert res.exit_code == 0, res.output
    assert "4 example block(s) of 3" in res.output  # train 0-3, 3-6, 6-8; test 8-11
    folder = KernelProblem.load(tmp_path / "K.kernel")
    assert folder.on_disk and list(folder.train_ids[:2]) == ["r0", "r1"]
    manifest = json.loads((tmp_path / "K.kernel" / "kernel.json").read_text())["manifest"]
    assert manifest["example_block"] == 3 and manifest["trainable"] == "top:1"
    assert run(["kernel", *common, "-o", tmp_path / "K.npz"]).exit_code == 0
    in_memory = KernelProblem.load(tmp_path / "K.npz")
    scale = abs(in_memory.k_train).max()
    assert abs(folder.k_train - in_memory.k_train).max() < 1e-5 * scale
    assert abs(folder.k_test - in_memory.k_test).max() < 1e-5 * scale
    before = (tmp_path / "K.kernel" / "k_train.npy").stat().st_mtime_ns
    res = run(["kernel", *common, "-o", tmp_path / "K.kernel", "--example-block", 3])
    assert res.exit_code == 0 and "is up to date" in res.output  # nothing recomputed
    assert (tmp_path / "K.kernel" / "k_train.npy").stat().st_mtime_ns == before
    res = run(["kernel", *common, "-o", tmp_path / "K2.kernel", "--example-block", 3, "--head", "random",
               "--head-seed", 1])
    assert res.exit_code == 0 and "up to date" not in res.output
    res = run(["value", "--kernel", tmp_path / "K.kernel", "--low-rank", 4, "--permutations", 3, "-o", tmp_path / "v.csv"])
    assert res.exit_code == 0, res.output
    assert list(pd.read_csv(tmp_path / "v.csv")["example_id"][:2]) == ["r0", "r1"]


@pytest.mark.parametrize("extra, message", [
    (["-o", "K.npz", "--example-block", "3"], "writes a kernel folder by blocks: give -o NAME.kernel"),
    (["-o", "K.kernel", "--cache-dir", "cache"], "a kernel folder is its own cache"),
    (["-o", "K.kernel", "--distributed"], "runs under torchrun"),
    (["-o", "K.txt"], "ending in .kernel"),
])
def test_kernel_folder_usage_errors(tmp_path, data_files, tiny_bert_path, extra, message):
    train, test = data_files
    extra = [str(tmp_path / e) if e.startswith(("K.", "cache")) else e for e in extra]
    res = run(["kernel", "--train", train, "--test", test, "--model", tiny_bert_path, *extra])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "K.kernel").exists()


def test_per_class_kernel_through_the_cli(tmp_path, data_files, tiny_bert_path):
    train, test = data_files
    common = ["--train", train, "--test", test, "--model", tiny_bert_path, "--trainable", "top:1",
              "--kernel-mode", "per-class", "--no-progress"]
    res = run(["kernel", *common, "-o", tmp_path / "K.npz"])
    assert res.exit_code == 0, res.output
    problem = KernelProblem.load(tmp_path / "K.npz")
    assert problem.per_class and problem.k_train.shape == (2, 8, 8)
    res = run(["value", "--kernel", tmp_path / "K.npz", "--permutations", 3, "-o", tmp_path / "v.csv"])
    assert res.exit_code == 0, res.output
    res = run(["kernel", *common, "-o", tmp_path / "K.kernel"])
    assert res.exit_code == 2 and "a kernel folder holds one kernel" in res.output
    res = run(["value", "--kernel", tmp_path / "K.npz", "--low-rank", 3, "-o", tmp_path / "w.csv"])
    assert res.exit_code == 2 and "--low-rank approximates one kernel" in res.output


def test_an_interrupted_kernel_folder_command_resumes(tmp_path, data_files, tiny_bert_path, monkeypatch):
    """The interruption (Ctrl-C after the second row block) is simulated; the rerun is the real command."""
    from freeshap_dq.kernels.folder import KernelFolderWriter

    train, test = data_files
    args = ["kernel", "--train", train, "--test", test, "--model", tiny_bert_path, "--trainable", "top:1",
            "--example-block", 3, "--no-progress", "-o"]
    assert run([*args, tmp_path / "ref.kernel"]).exit_code == 0
    original = KernelFolderWriter.mark_done

    def interrupt_on_second(self, lo, hi):
        original(self, lo, hi)
        if len(list((self.tmp / "done").iterdir())) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(KernelFolderWriter, "mark_done", interrupt_on_second)
    res = run([*args, tmp_path / "K.kernel"])
    assert res.exit_code == 130 and "rerun the same command to resume" in res.output
    monkeypatch.setattr(KernelFolderWriter, "mark_done", original)
    res = run([*args, tmp_path / "K.kernel"])
    assert res.exit_code == 0 and "resuming" in res.output and "from 2 finished row block(s)" in res.output
    a, b = KernelProblem.load(tmp_path / "ref.kernel"), KernelProblem.load(tmp_path / "K.kernel")
    assert (a.k_train == b.k_train).all() and (a.k_test == b.k_test).all()
    assert a.fingerprint() == b.fingerprint()


def test_landmark_kernel_folder_through_the_cli(tmp_path, data_files, tiny_bert_path):
    from freeshap_dq.kernels.landmarks import LandmarkKernel

    train, test = data_files
    common = ["--train", train, "--test", test, "--model", tiny_bert_path, "--trainable", "top:1", "--no-progress"]
    res = run(["kernel", *common, "-o", tmp_path / "L.kernel", "--landmarks", 4, "--example-block", 3])
    assert res.exit_code == 0 and "8 x 4 landmark + 3 x 4 landmark kernel" in res.output, res.output
    kernel = KernelProblem.load(tmp_path / "L.kernel")
    assert isinstance(kernel, LandmarkKernel) and kernel.rank == 4 and list(kernel.train_ids[:2]) == ["r0", "r1"]
    assert run(["kernel", *common, "-o", tmp_path / "K.npz"]).exit_code == 0
    full = KernelProblem.load(tmp_path / "K.npz")
    scale = abs(full.k_train).max()
    assert abs(kernel.k_train_landmarks - full.k_train[:, kernel.landmarks]).max() < 1e-5 * scale
    assert abs(kernel.diagonal() - full.k_train.diagonal()).max() < 1e-5 * scale
    res = run(["value", "--kernel", tmp_path / "L.kernel", "--permutations", 3, "-o", tmp_path / "v.csv"])
    assert res.exit_code == 0, res.output
    assert list(pd.read_csv(tmp_path / "v.csv")["example_id"][:2]) == ["r0", "r1"]
    for args, message in ((["value", "--kernel", tmp_path / "L.kernel", "--method", "loo"], "needs the whole kernel"),
                          (["cleanlab", "audit", "--kernel", tmp_path / "L.kernel", "--lab-dir", tmp_path / "lab"],
                           "need the whole kernel"),
                          (["kernel", *common, "-o", tmp_path / "L.npz", "--landmarks", 4], "give -o NAME.kernel"),
                          (["kernel", *common, "-o", tmp_path / "M.kernel", "--landmarks", 9], "more than the 8")):
        res = run(args)
        assert res.exit_code == 2 and message in res.output, res.output


def test_folder_only_options_are_not_ignored_by_value(tmp_path, data_files, tiny_bert_path):
    train, test = data_files
    for flag in ("--landmarks", "--example-block"):
        res = run(["value", "--train", train, "--test", test, "--model", tiny_bert_path, flag, 3, "-o", tmp_path / "v.csv"])
        assert res.exit_code == 2 and f"{flag} builds a kernel folder" in res.output and not (tmp_path / "v.csv").exists()
