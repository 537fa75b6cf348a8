"""A minimal third-party attnkit backend (see plugin.py)."""
