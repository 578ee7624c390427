"""Package discovery for the three source roots (metadata lives in pyproject.toml).

``freeshap_dq/`` is the core; ``cli/`` and ``integrations/`` sit beside it at the top of the repository (the
layout the project keeps) and install as ``freeshap_dq.cli`` and ``freeshap_dq.integrations``. Every
subpackage under each root is found here, so a new one is never left out of the wheel.
"""

from setuptools import find_packages, setup

ROOTS = {"freeshap_dq": "freeshap_dq", "freeshap_dq.cli": "cli", "freeshap_dq.integrations": "integrations"}

setup(
    package_dir=ROOTS,
    packages=[f"{name}.{sub}" if sub else name
              for name, folder in ROOTS.items() for sub in ["", *find_packages(folder)]],
)
