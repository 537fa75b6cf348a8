"""A plugin whose import calls sys.exit (a script's guard run as a module, say)."""
import sys

sys.exit(3)
