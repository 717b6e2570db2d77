"""Streaming I/O: atomic outputs (``atomic``), lazy tensor reading (``store``), zero-copy row
blocks (``source``), streaming safetensors and model writing (``writer``).

Import the submodules themselves: this package imports nothing, so that ``io.atomic`` (used by
every command before any work) does not load torch.
"""
