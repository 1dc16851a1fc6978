"""Accuracy measured the way interactive segmentation is reported: a first prompt (box or point), then
simulated corrective clicks (`clicks.py`, `protocol.py`); the `evaluate` command is
`commands/evaluate.py`."""
