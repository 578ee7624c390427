"""The distribution as a user gets it: a wheel (and an sdist) built from the tracked files, installed alone.

The wheel goes into a fresh virtual environment that sees the development environment's third-party packages
(through a plain path entry, so the checkout's editable finder is never loaded) and runs from a folder outside
the checkout: every module imports from the installed copy, every command's ``--help`` works, and a small
``value --kernel`` run writes its table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = {"freeshap_dq": "freeshap_dq", "cli": "freeshap_dq.cli", "integrations": "freeshap_dq.integrations"}
NEEDED_IN_SDIST = ("README.md", "LICENSE", "pyproject.toml", "setup.py")

pytestmark = pytest.mark.slow


def source_packages() -> set[str]:
    """Every package of the source tree, under the name it is installed as."""
    found = set()
    for folder, name in SOURCE_ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            found.add(".".join([name, *parts]))
    return found


def source_modules() -> set[str]:
    found = set()
    for folder, name in SOURCE_ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts[-1:] == ["__main__"]:
                continue
            found.add(".".join([name, *parts]))
    return found


def tracked_copy(dest: Path) -> Path:
    """The files git would commit (tracked and new, not ignored): what a clean clone builds from."""
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                             capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listing):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def build(kind: str, source: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, f"building the {kind} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files are part of the project")
    work = tmp_path_factory.mktemp("dist")
    source = tracked_copy(work / "source")
    sdist = build("sdist", source, work / "out")
    with tarfile.open(sdist) as archive:
        archive.extractall(work / "unpacked", filter="data")
    (unpacked,) = (work / "unpacked").iterdir()
    wheel_from_sdist = build("wheel", unpacked, work / "from-sdist")
    wheel = build("wheel", source, work / "from-tree")
    return {"sdist": sdist, "wheel": wheel, "wheel_from_sdist": wheel_from_sdist}


def wheel_packages(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name.rsplit("/", 1)[0].replace("/", ".") for name in archive.namelist() if name.endswith("/__init__.py")}


def test_wheel_holds_every_package(dists):
    want = source_packages()
    for key in ("wheel", "wheel_from_sdist"):
        missing = want - wheel_packages(dists[key])
        assert not missing, f"the {key.replace('_', ' ')} lacks packages {sorted(missing)}"


def test_sdist_holds_what_a_build_needs(dists):
    with tarfile.open(dists["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = [name for name in NEEDED_IN_SDIST if name not in names]
    assert not missing, f"the sdist lacks {missing}"
    for folder in SOURCE_ROOTS:
        assert any(name.startswith(f"{folder}/") and name.endswith(".py") for name in names), folder


def test_installed_wheel_runs_every_command(dists, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                              str(dists["wheel"])], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # third-party packages of this environment, as a plain path: .pth files there (the editable finder) never run
    (site / "zz_development_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(14, 3))
    k = x @ x.T + 0.1 * np.eye(14)
    y = (x[:, 0] > 0).astype(int)
    np.savez(outside / "K.npz", k_train=k[:10, :10], k_test=k[10:, :10], y_train=y[:10], y_test=y[10:])
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONNOUSERSITE="1")

    check = textwrap.dedent(f"""
        import importlib, json, sys
        from pathlib import Path
        import click
        from click.testing import CliRunner
        site = Path({str(site)!r}).resolve()
        failures = {{}}
        for name in sorted(json.loads({json.dumps(json.dumps(sorted(source_modules())))})):
            try:
                module = importlib.import_module(name)
            except Exception as exc:
                failures[name] = f"{{type(exc).__name__}}: {{exc}}"
                continue
            if not Path(module.__file__).resolve().is_relative_to(site):
                failures[name] = f"imported from {{module.__file__}}, not from the installed wheel"
        def commands(group, path):
            yield path
            for name, command in getattr(group, "commands", {{}}).items():
                yield from commands(command, path + [name])
        try:
            from freeshap_dq.cli.main import cli
        except Exception as exc:
            failures["freeshap_dq.cli.main"] = f"{{type(exc).__name__}}: {{exc}}"
        else:
            for path in commands(cli, []):
                out = CliRunner().invoke(cli, path + ["--help"])
                if out.exit_code != 0 or "Usage:" not in out.output:
                    failures[" ".join(["freeshap-dq", *path, "--help"])] = out.output[-500:] + repr(out.exception)
            if len(list(commands(cli, []))) < 10:
                failures["commands"] = f"only {{len(list(commands(cli, [])))}} commands found"
        print(json.dumps(failures))
    """)
    done = subprocess.run([str(python), "-c", check], cwd=outside, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "from the installed wheel:\n" + "\n".join(f"{k}: {v}" for k, v in failures.items())

    script = env_dir / "bin" / "freeshap-dq"
    helped = subprocess.run([str(script), "--help"], cwd=outside, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "Usage:" in helped.stdout, helped.stderr[-2000:]
    valued = subprocess.run([str(script), "value", "--kernel", "K.npz", "--permutations", "4", "-o", "v.csv"],
                            cwd=outside, env=env, capture_output=True, text=True)
    assert valued.returncode == 0, valued.stderr[-3000:]
    table = (outside / "v.csv").read_text().splitlines()
    assert len(table) == 11 and table[0].startswith("train_index"), table[:3]
