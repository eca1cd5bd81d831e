"""Pipeline schedules as data, and the runtimes that execute them.

A schedule is a table of `Task`s ``(tick, stage, microbatch, kind, chunk)``:
at ``tick`` the devices of pipeline ``stage`` run the forward ("F") or
backward ("B") pass of ``microbatch`` through their model ``chunk`` (always 0
except for interleaved 1F1B, where each device holds ``v`` chunks and chunk
``c`` of stage ``s`` is virtual stage ``c * S + s``).  Every task takes one
tick: a forward and a backward of one chunk are assumed to cost the same, the
convention under which the published bubble formulas are stated.

Schedules are built from each stage's *order* of tasks (as Megatron-LM and
JaxPP write them) by a list-scheduling simulation: a task runs at the first
tick at which its stage is free and its inputs exist (the forward of the
previous virtual stage, or the backward of the next one, at an earlier tick).

Bubble fraction = idle slots / all slots = 1 - busy / (S * ticks); with
``S`` stages, ``B`` microbatches and ``v`` chunks per stage:

* GPipe (Huang et al. 2019): all forwards, then all backwards:
  ``(S - 1) / (B + S - 1)``.
* 1F1B (PipeDream-Flush; Narayanan et al. 2021): the same bubble, but stage
  ``s`` holds at most ``S - s`` microbatches' activations instead of ``B``.
* Interleaved 1F1B (Megatron-LM, Narayanan et al. SC'21, section 2.2.2): the
  bubble time shrinks by ``v``: ``(S - 1) / (v * B + S - 1)`` of the step
  (the paper's ``(p - 1) / (v * m)`` is the same bubble relative to the ideal
  time), for ``B`` a multiple of ``S``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

FORWARD = "F"
BACKWARD = "B"
SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True, order=True)
class Task:
    """One unit of pipeline work: a forward or backward of one microbatch through one stage's chunk."""

    tick: int
    stage: int
    microbatch: int
    kind: str  # FORWARD or BACKWARD
    chunk: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    """A pipeline schedule: which stage runs which microbatch's forward or backward at each tick.

    >>> s = schedule("1f1b", stages=2, microbatches=3)
    >>> print(s)
    1f1b: 2 stages, 3 microbatches, 8 ticks, bubble 25.0%
    stage 0 | F0 F1 .  B0 F2 B1 .  B2
    stage 1 | .  F0 B0 F1 B1 F2 B2 .
    >>> s.bubble_fraction == (2 - 1) / (3 + 2 - 1)
    True
    """

    name: str
    num_stages: int
    num_microbatches: int
    virtual: int
    tasks: tuple[Task, ...]

    @property
    def num_ticks(self) -> int:
        return 1 + max(t.tick for t in self.tasks)

    @property
    def bubble_fraction(self) -> float:
        """Idle stage-ticks over all stage-ticks."""
        return 1.0 - len(self.tasks) / (self.num_stages * self.num_ticks)

    def grid(self) -> list[list[Task | None]]:
        """``grid[stage][tick]``: the task a stage runs at a tick, or None when it idles."""
        cells: list[list[Task | None]] = [[None] * self.num_ticks for _ in range(self.num_stages)]
        for task in self.tasks:
            cells[task.stage][task.tick] = task
        return cells

    def in_flight(self, stage: int) -> int:
        """The most microbatches whose forward has run on ``stage`` and backward has not (any chunk)."""
        live = peak = 0
        for task in sorted((t for t in self.tasks if t.stage == stage), key=lambda t: t.tick):
            live += 1 if task.kind == FORWARD else -1
            peak = max(peak, live)
        return peak

    def __str__(self) -> str:
        chunk_name = (lambda c: "abcdefghijklmnopqrstuvwxyz"[c]) if self.virtual > 1 else (lambda c: "")
        cells = [[f"{t.kind}{t.microbatch}{chunk_name(t.chunk)}" if t else "." for t in row] for row in self.grid()]
        width = max(len(c) for row in cells for c in row)
        head = (f"{self.name}: {self.num_stages} stages, {self.num_microbatches} microbatches"
                + (f", {self.virtual} chunks per stage" if self.virtual > 1 else "")
                + f", {self.num_ticks} ticks, bubble {100 * self.bubble_fraction:.1f}%")
        rows = [f"stage {s} | " + " ".join(c.ljust(width) for c in row).rstrip() for s, row in enumerate(cells)]
        return "\n".join([head, *rows])


def bubble_formula(name: str, stages: int, microbatches: int, virtual: int = 1) -> float:
    """The published bubble fraction of a schedule (idle share of the step, F and B of equal cost).

    >>> bubble_formula("gpipe", 4, 8)
    0.2727272727272727
    """
    v = virtual if name == "interleaved" else 1
    return (stages - 1) / (v * microbatches + stages - 1)


def schedule(name: str, *, stages: int, microbatches: int, virtual: int = 2) -> Schedule:
    """Build the schedule table ``name`` ("gpipe", "1f1b" or "interleaved") for a pipeline.

    ``virtual`` (chunks per stage) only applies to "interleaved", which also
    needs ``microbatches`` to be a multiple of ``stages`` (Megatron-LM's
    grouping of microbatches).

    >>> schedule("gpipe", stages=4, microbatches=8).num_ticks
    22
    """
    if stages < 1 or microbatches < 1:
        raise ValueError(f"a pipeline needs stages >= 1 and microbatches >= 1, got {stages} and {microbatches}")
    if name == "gpipe":
        orders = [[(FORWARD, m, 0) for m in range(microbatches)] + [(BACKWARD, m, 0) for m in range(microbatches)]
                  for _ in range(stages)]
        virtual = 1
    elif name == "1f1b":
        orders = [_one_f_one_b([(m, 0) for m in range(microbatches)], min(stages - s - 1, microbatches),
                               [(m, 0) for m in range(microbatches)]) for s in range(stages)]
        virtual = 1
    elif name == "interleaved":
        orders = _interleaved_orders(stages, microbatches, virtual)
    else:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {SCHEDULES}")
    tasks = _simulate(orders, stages, virtual)
    return Schedule(name=name, num_stages=stages, num_microbatches=microbatches, virtual=virtual,
                    tasks=tuple(sorted(tasks, key=lambda t: (t.tick, t.stage))))


def _one_f_one_b(forwards: Sequence[tuple[int, int]], warmup: int,
                 backwards: Sequence[tuple[int, int]]) -> list[tuple[str, int, int]]:
    """Warm-up forwards, then alternate one forward and one backward, then the remaining backwards."""
    order = [(FORWARD, m, c) for m, c in forwards[:warmup]]
    rest_f, rest_b = list(forwards[warmup:]), list(backwards)
    while rest_f:
        m, c = rest_f.pop(0)
        order.append((FORWARD, m, c))
        m, c = rest_b.pop(0)
        order.append((BACKWARD, m, c))
    order += [(BACKWARD, m, c) for m, c in rest_b]
    return order


def _interleaved_orders(stages: int, microbatches: int, virtual: int) -> list[list[tuple[str, int, int]]]:
    """Megatron-LM's interleaved 1F1B order per stage (``forward_backward_pipelining_with_interleaving``)."""
    if virtual < 1:
        raise ValueError(f"interleaved 1F1B needs virtual >= 1 chunks per stage, got {virtual}")
    if microbatches % stages:
        raise ValueError(f"interleaved 1F1B runs microbatches in groups of the stage count: {microbatches} "
                         f"microbatches is not a multiple of {stages} stages; pass a multiple of {stages}")
    total = virtual * microbatches

    def unit(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // stages) % virtual
        return (k // (stages * virtual)) * stages + k % stages, (virtual - 1 - chunk) if backward else chunk

    forwards = [unit(k, False) for k in range(total)]
    backwards = [unit(k, True) for k in range(total)]
    orders = []
    for s in range(stages):
        warmup = total if microbatches == stages else min((stages - s - 1) * 2 + (virtual - 1) * stages, total)
        orders.append(_one_f_one_b(forwards, warmup, backwards))
    return orders


def _simulate(orders: list[list[tuple[str, int, int]]], stages: int, virtual: int) -> list[Task]:
    """Assign ticks: each stage runs its order in sequence, a task waits for its producer's earlier tick."""
    done: dict[tuple[str, int, int], int] = {}  # (kind, microbatch, virtual stage) -> tick
    position = [0] * stages
    free = [0] * stages
    tasks: list[Task] = []
    last = stages * virtual - 1
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(stages):
            if position[s] == len(orders[s]):
                continue
            kind, m, chunk = orders[s][position[s]]
            vs = chunk * stages + s
            if kind == FORWARD:
                deps = [(FORWARD, m, vs - 1)] if vs > 0 else []
            else:
                deps = [(FORWARD, m, vs)] + ([(BACKWARD, m, vs + 1)] if vs < last else [])
            if any(d not in done for d in deps):
                continue
            tick = max([free[s]] + [done[d] + 1 for d in deps])
            done[(kind, m, vs)] = tick
            tasks.append(Task(tick=tick, stage=s, microbatch=m, kind=kind, chunk=chunk))
            free[s] = tick + 1
            position[s] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            raise ValueError("the schedule's per-stage orders deadlock (a task waits on one that never runs)")
    return tasks
