"""Adapters to cleanlab and Label Studio (optional extras); the core never imports them."""
