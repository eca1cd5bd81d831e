"""Sharding strategies per primitive (see `base` for the registry and the protocol)."""

from autoplan._src.strategies import core as core  # noqa: F401  (registers rules)
from autoplan._src.strategies.base import (  # noqa: F401
    Collective, Context, Spec, Strategy, StrategyRule, UnsupportedPrimitiveWarning, enumerate_specs,
    register_strategy, registered, replicated, reshard_collectives, reshard_matrix,
    reshard_seconds, spec_name, strategies_for, to_partition_spec)
from autoplan._src.strategies import conv as conv, indexing as indexing  # noqa: F401
from autoplan._src.strategies import control as control  # noqa: F401
