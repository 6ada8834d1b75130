"""Workflows: what the command line and the tasks run (scan, process, control, reconcile,
status), built on the parts below them."""
