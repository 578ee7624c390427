r"""Is the fitted head's *scale* a lever? (docs/evaluation.md, "Levers beside the fitted head")

With a linear head on the pooled encoder, the eNTK splits into the head's part and the trainable blocks' part,

.. math::  K = K_{head} + K_{blocks}, \qquad K_{head}(x, x') = \langle\phi(x), \phi(x')\rangle + 1,

where :math:`K_{head}` (the gradient with respect to the class-0 row and bias is the pooled vector and 1) is the
same for every head, and :math:`K_{blocks}` scales with the head's squared weights, whose size cross-validation's C
sets. This script rescales the blocks' part of finished fitted-head kernels, :math:`K_{head} + \alpha K_{blocks}`,
and reruns the detectors on them, without any new eNTK:

    python benchmarks/head_scale_ablation.py --run study/rotten-tomatoes-fit --alphas 0.25,4 --out study

It needs the run's cached kernels (``<run>/kernels``) and computes the head-only kernel once (one short evaluate
run). It checks that :math:`K - K_{head}` is positive semidefinite for every kernel (else the split is wrong) and
writes, per alpha, a scratch cache of rescaled kernels under their original manifests (``<out>/head-scale-<alpha>``):
those folders hold ablation kernels, not eNTKs, and are only for this comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def evaluate(config: dict, out: Path, *extra: str) -> None:
    command = [sys.executable, "-m", "freeshap_dq.cli", "evaluate", "--dataset", config["dataset"], "--model",
               config["model"], "--n-train", str(config["n_train"]), "--n-test", str(config["n_test"]),
               "--max-length", str(config["max_length"]), "--experiments", "detection", "--no-progress", *extra,
               "-o", str(out)]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, env=ENV, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished evaluate run with --head fit")
    parser.add_argument("--alphas", default="0.25,4")
    parser.add_argument("--out", type=Path, default=Path("detector-study"))
    args = parser.parse_args()
    config = json.loads((args.run / "manifest.json").read_text())["config"]
    head_only = args.out / "head-only-kernel"
    evaluate(config, head_only, "--head", "random", "--trainable", "head-only", "--seeds", "0", "--noise-modes",
             "symmetric")
    head = load_file(next((head_only / "kernels").glob("*.safetensors")))
    kernels = sorted((args.run / "kernels").glob("*.safetensors"))
    for alpha in (float(a) for a in args.alphas.split(",")):
        folder = args.out / f"head-scale-{alpha:g}"
        (folder / "kernels").mkdir(parents=True, exist_ok=True)
        for path in kernels:
            arrays = load_file(path)
            with safe_open(path, "np") as handle:
                metadata = handle.metadata()
            blocks = {name: arrays[name] - head[name] for name in ("k_train", "k_test")}
            smallest = np.linalg.eigvalsh(blocks["k_train"])[0] / np.abs(blocks["k_train"]).max()
            if smallest < -1e-6:
                raise SystemExit(f"{path}: K - K_head has eigenvalue {smallest:.2g} x max: not the same examples?")
            arrays.update({name: head[name] + alpha * blocks[name] for name in blocks})
            save_file(arrays, folder / "kernels" / path.name, metadata=metadata)
            (folder / "kernels" / path.with_suffix(".json").name).write_text(path.with_suffix(".json").read_text())
        evaluate(config, folder, "--head", "fit", "--trainable", config["trainable"],
                 "--ridge", config["ridge"], "--permutations", str(config["permutations"]), "--seeds", config["seeds"],
                 "--noise-modes", config["noise_modes"])
        print(f"alpha {alpha:g}: {folder / 'results.md'}")


if __name__ == "__main__":
    main()
