"""Adapters to cleanlab and Label Studio (optional extras); the core never imports them.

Importing this package registers the ``freeshap`` cleanlab issue type when cleanlab is installed,
so ``Datalab.load(...).get_issues("freeshap")`` works in a fresh process after
``import freeshap_dq.integrations``.
"""

try:  # registering is a side effect of importing the adapter
    from freeshap_dq.integrations import cleanlab  # noqa: F401
except ImportError:  # cleanlab not installed: the rest of freeshap-dq works without it
    pass
