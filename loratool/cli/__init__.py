"""The ``loratool`` command line: parse, call the library, print, map errors to exit codes.

Each command lives in its own module of this package and exposes ``command``; ``main``
registers every module listed in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import importlib

from loratool.cli.common import LoratoolGroup, main_group

COMMAND_MODULES = (
    "inspect",
    "merge",
    "unmerge",
    "verify",
    "rescale",
    "rerank",
    "combine",
    "extract",
    "convert",
    "push",
    "check",
)


def _register() -> None:
    for name in COMMAND_MODULES:
        module_name = f"loratool.cli.{name}_cmd"
        try:
            mod = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # command not built yet
            raise
        main_group.add_command(mod.command)


_register()
main = main_group

__all__ = ["LoratoolGroup", "main"]
