"""The LCIRC recipe's script arguments (a TrlParser dataclass: YAML defaults, CLI overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctxzip.trainers.script_args import CompressorScriptArguments


@dataclass
class LCIRCScriptArguments(CompressorScriptArguments):
    """The memory-compressor script arguments, and which of the two LCIRC compressors the recipe trains."""

    query_dependent: bool = field(default=False, metadata={
        "help": "train QD-LCIRC (a query mixer before each compression step; one memory per question), "
                "usually with --init_from an LCIRC export; false: LCIRC"})
