"""`optimum-cli stablequant RECIPE.yaml`: the `stablequant run` command inside optimum's CLI.

optimum-cli imports every module of the PEP-420 namespace `optimum.commands.register` and registers
the classes in its `REGISTER_COMMANDS`. This directory must therefore never hold an `__init__.py`
(neither here nor in optimum/ or optimum/commands/): that would shadow the installed optimum package.
Importing this module needs optimum (`pip install sq-plugin[optimum]`); it stays light (no torch).
"""

from __future__ import annotations

import sys
from argparse import ArgumentParser

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from sq_plugin.cli import add_run_arguments, run_command


class StableQuantCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="stablequant", help="StableQuant: run a quantization recipe (sq_plugin)")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        add_run_arguments(parser)

    def run(self) -> None:
        code = run_command(self.args)
        if code:
            sys.exit(code)


REGISTER_COMMANDS = [StableQuantCommand]
