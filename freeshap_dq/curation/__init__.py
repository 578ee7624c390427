"""Curation: acting on values — removal and selection policies, relabel tables, the HTML/text report."""
