"""A module named as a plugin that implements no hook."""
