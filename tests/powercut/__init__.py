"""The power-cut file system (cutfs.py) and its harness (harness.py)."""
