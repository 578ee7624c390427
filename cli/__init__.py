"""The freeshap-dq command line (click)."""
