"""toolexec: workspaces and the tools that act in them (see docs/toolexec.md)."""
