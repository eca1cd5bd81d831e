"""The Graph IR: operators and tensors of a traced step, with shapes and layers.

Passes read a `Graph` and return data; they never look at JAX objects.  Each
operator knows its primitive, its operands and results (tensor ids), the layer
it belongs to (from the Flax name stack, forward and backward alike), its role
in the step and, for graph inputs and outputs, the pytree path of the leaf.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# Roles of operators.  Inputs and outputs are pseudo-operators, so that every
# tensor has a producer and every graph leaf has a sharding decision.
INPUT = "input"
OUTPUT = "output"
CONSTANT = "constant"
FORWARD = "forward"
BACKWARD = "backward"
OPTIMIZER = "optimizer"
ROLES = (INPUT, OUTPUT, CONSTANT, FORWARD, BACKWARD, OPTIMIZER)

LITERAL = -1  # tensor id of a scalar literal operand


def itemsize(dtype: str) -> int:
    """Bytes per element; extended dtypes (PRNG keys) count as their two uint32 words."""
    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        return 8


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Tensor:
    id: int
    shape: tuple[int, ...]
    dtype: str
    producer: int
    output_index: int = 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * itemsize(self.dtype)

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Op:
    id: int
    primitive: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[str, ...]
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    layer: str = ""
    role: str = FORWARD
    name_stack: str = ""
    path: str | None = None
    source_info: Any = None
    signature: tuple = ()
    # Stable identity from `autoplan._src.walk` ("7/body/3"); empty for inputs, outputs, constants.
    key: str = ""
    # How many times the operator runs per step: the trip counts of the loops around it.
    repeat: int = 1

    @property
    def source(self) -> str:
        from autoplan._src import compat

        return compat.source_summary(self.source_info)

    @property
    def label(self) -> str:
        """'block3/transpose: dot_general' style name for messages and tables."""
        where = self.path or self.layer or "<top>"
        return f"{where} [{self.role}] {self.primitive}"


@dataclasses.dataclass(kw_only=True, slots=True, eq=False)
class Graph:
    """A traced step.  Built once by `autoplan._src.trace.trace` and read-only after."""

    ops: list[Op]
    tensors: list[Tensor]
    input_ops: list[int]
    output_ops: list[int]
    input_tree: Any
    output_tree: Any
    input_paths: list[str]
    output_paths: list[str]
    # Output leaf index -> input leaf index that it updates (params, optimizer state).
    aliases: dict[int, int]
    layers: list[str]
    closed_jaxpr: Any = None
    # Pairs of operators whose first result / operand must share one layout: a loop carry
    # as it enters the body and as the body hands it back.
    ties: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    consumers: list[list[tuple[int, int]]] = dataclasses.field(default_factory=list)
    last_use: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        consumers: list[list[tuple[int, int]]] = [[] for _ in self.tensors]
        for op in self.ops:
            for k, t in enumerate(op.inputs):
                if t != LITERAL:
                    consumers[t].append((op.id, k))
        self.consumers = consumers
        self.last_use = [max((c for c, _ in cs), default=self.tensors[t].producer)
                         for t, cs in enumerate(consumers)]

    def __len__(self) -> int:
        return len(self.ops)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.role] = counts.get(op.role, 0) + 1
        parts = ", ".join(f"{n} {r}" for r, n in counts.items())
        return f"Graph({len(self.ops)} ops: {parts}; {len(self.layers)} layers)"

    def __repr__(self) -> str:
        return self.summary()

