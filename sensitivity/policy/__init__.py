"""Policy: which method each layer gets (fp | naive | smoothquant), as ordered glob rules in YAML.

Reads the LayerTable (pandas); never imports torch modules, `capture/` or the CLI.
"""

from sensitivity.policy.assign import DEFAULT_SQ_MARGIN, assign_methods
from sensitivity.policy.exclude import (
    DEFAULT_MAX_REL_L1,
    DEFAULT_MIN_SQNR_DB,
    Thresholds,
    exclude_by_thresholds,
)
from sensitivity.policy.glob import compile_glob, glob_match, is_literal
from sensitivity.policy.io import (
    UnmatchedPatternWarning,
    dump_exclude,
    dump_policy,
    load_exclude,
    load_exclude_entries,
    load_policy,
    parse_exclude,
    parse_policy,
    write_exclude,
    write_policy,
)
from sensitivity.policy.rules import ExcludeEntry, Policy, Rule, exclusion_policy

__all__ = [
    "DEFAULT_MAX_REL_L1",
    "DEFAULT_MIN_SQNR_DB",
    "DEFAULT_SQ_MARGIN",
    "ExcludeEntry",
    "Policy",
    "Rule",
    "Thresholds",
    "UnmatchedPatternWarning",
    "assign_methods",
    "compile_glob",
    "dump_exclude",
    "dump_policy",
    "exclude_by_thresholds",
    "exclusion_policy",
    "glob_match",
    "is_literal",
    "load_exclude",
    "load_exclude_entries",
    "load_policy",
    "parse_exclude",
    "parse_policy",
    "write_exclude",
    "write_policy",
]
