"""``python -m freeshap_dq.cli`` = the ``freeshap-dq`` command."""

from .main import main

main()
