"""Data: labelled text tables (read, checked, written), the packaged datasets, synthetic kernel problems."""
