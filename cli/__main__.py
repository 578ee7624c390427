"""``python -m freeshap_dq.cli`` = the ``freeshap-dq`` command."""

from freeshap_dq.cli import main

main()
