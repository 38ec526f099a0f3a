"""Bounds on the work of loading one rule set, whatever the input.

A rule file is small and written by hand; these limits are far above anything real and keep a hostile or
broken file (an alias bomb, thousands of nesting levels, a multi-megabyte string) to a bounded amount of
time and memory, reported as a ``RuleError`` instead of a hang or a crash. The README's "Rule files"
section lists them.
"""

from __future__ import annotations

MAX_FILE_BYTES = 1 << 20  # one rule file, or YAML text given as a string
MAX_TOTAL_BYTES = 2 << 20  # every file of one rule set together
MAX_FILES = 256  # files of one rule set (the one loaded and everything it includes)
MAX_INCLUDE_DEPTH = 32  # a includes b includes c ...
MAX_NAME_CHARS = 1024  # an include name
MAX_DEPTH = 64  # nesting of YAML mappings and sequences
MAX_NODES = 100_000  # YAML values in one file, counting what every alias expands to
MAX_NUMBER_CHARS = 256  # an integer or float as written (very long ones cost quadratic time to convert)
MAX_RULES = 10_000  # rules of one rule set
MAX_REGEX_CHARS = 4096  # one match.name regex
MAX_VARIABLE_NODES = 2_000  # values of all variables together (OmegaConf copies them)
MAX_INTERPOLATED_CHARS = 4096  # one string holding ${...}
MAX_INTERPOLATION_WORK = 200_000  # characters interpolation may produce in all (each ${...} counts 100)
INTERPOLATION_COST = 100  # what one ${...} counts towards MAX_INTERPOLATION_WORK
MAX_REFERENCE_DEPTH = 16  # variables whose values refer to variables that refer to ...
