"""crushd: a headless daemon that runs AI coding-agent turns for workspaces."""

__version__ = "0.1.0"
