"""A mixed-integer program as sparse rows, solved by HiGHS or by CP-SAT.

The intra-operator ILP (one-hot choices, Alpa's linearized edge variables,
fixed charges for combined collectives, memory rows) has an LP relaxation that
is integral, or nearly so, on the steps we plan.  A simplex method therefore
proves most plans optimal at the root: HiGHS's dual simplex solves the
relaxation of Hugging Face T5 at d=1024 on a 2x4 mesh in about 2 s, where
CP-SAT's search needed 75 s to prove the same optimum.  HiGHS (through
``scipy.optimize``) is the default; when the relaxation is fractional its
branch and bound takes over.  CP-SAT stays as a second, independent solver of
the same rows, which the tests check HiGHS against.

Every variable is bounded in ``[0, upper]``.  CP-SAT solves over integers only,
so a caller's continuous variables must take integer values at an optimum
whose integral variables are integral (true of edge and fixed-charge
variables, and of a peak that may round up).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping

import numpy as np
import scipy.optimize
import scipy.sparse
from ortools.sat.python import cp_model

SOLVERS = ("highs", "cp-sat")
_INTEGRAL_TOLERANCE = 1e-6
_CP_SAT_SCALE = 1e9  # the objective's integer resolution in CP-SAT, relative to its largest value


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Program:
    """Minimise ``cost @ x`` subject to ``row_lower <= matrix @ x <= row_upper``, ``0 <= x <= upper``."""

    cost: np.ndarray
    upper: np.ndarray
    integral: np.ndarray  # bool per variable
    matrix: scipy.sparse.csr_array
    row_lower: np.ndarray
    row_upper: np.ndarray
    start: np.ndarray  # a feasible point (the warm start CP-SAT loads)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Result:
    values: np.ndarray | None  # None when no solution was found
    status: str  # "optimal" | "feasible" (time limit) | "infeasible" | "unknown" (time limit, none found)
    gap: float = 0.0  # relative gap to the best bound when "feasible"


class Rows:
    """Builds a :class:`Program` one block of variables and one row at a time.

    >>> rows = Rows()
    >>> x = rows.add_variables(2, integral=True, cost=[1.0, 3.0], start=[0, 1])
    >>> rows.add_row(x, [1.0, 1.0], lower=1.0, upper=1.0)
    >>> solve(rows.build(), time_limit=10).values.round().tolist()
    [1.0, 0.0]
    """

    def __init__(self):
        self._cost, self._upper, self._integral, self._start = [], [], [], []
        self._count = 0
        self._entries: list[tuple[np.ndarray, np.ndarray]] = []
        self._lower_bounds: list[float] = []
        self._upper_bounds: list[float] = []

    def add_variables(self, count: int, *, integral: bool, cost=0.0, upper=1.0, start=0.0) -> np.ndarray:
        """Adds ``count`` variables; returns their indices."""
        self._cost.append(np.broadcast_to(np.asarray(cost, float), (count,)))
        self._upper.append(np.broadcast_to(np.asarray(upper, float), (count,)))
        self._start.append(np.broadcast_to(np.asarray(start, float), (count,)))
        self._integral.append(np.full(count, integral))
        index = np.arange(self._count, self._count + count)
        self._count += count
        return index

    def add_row(self, index, coefficients, *, lower: float = -math.inf, upper: float = math.inf) -> None:
        self._entries.append((np.asarray(index, np.int64), np.asarray(coefficients, float)))
        self._lower_bounds.append(lower)
        self._upper_bounds.append(upper)

    def build(self) -> Program:
        row_ids = np.concatenate([np.full(len(i), r) for r, (i, _) in enumerate(self._entries)] or [[]])
        columns = np.concatenate([i for i, _ in self._entries] or [[]]).astype(np.int64)
        values = np.concatenate([c for _, c in self._entries] or [[]])
        matrix = scipy.sparse.csr_array((values, (row_ids.astype(np.int64), columns)),
                                        shape=(len(self._entries), self._count))
        join = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
        return Program(cost=join(self._cost, float), upper=join(self._upper, float),
                       integral=join(self._integral, bool), matrix=matrix,
                       row_lower=np.asarray(self._lower_bounds, float), row_upper=np.asarray(self._upper_bounds, float),
                       start=join(self._start, float))


def solve(program: Program, *, solver: str = "highs", time_limit: float = 60.0, num_workers: int = 1,
          params: Mapping[str, object] | None = None) -> Result:
    """Solves ``program`` to optimality or until ``time_limit`` seconds have passed."""
    if solver == "highs":
        return _solve_highs(program, time_limit, params or {})
    if solver == "cp-sat":
        return _solve_cp_sat(program, time_limit, num_workers, params or {})
    raise ValueError(f"unknown solver {solver!r}; use one of {SOLVERS}")


def _solve_highs(program: Program, time_limit: float, params: Mapping[str, object]) -> Result:
    """The LP relaxation first (dual simplex); branch and bound only if it is fractional."""
    start = time.perf_counter()
    relaxed = _relaxation(program, time_limit, params)
    if relaxed.status == 2:
        return Result(values=None, status="infeasible")
    if relaxed.status == 0:
        values = relaxed.x
        rounded = np.round(values[program.integral]) + 0.0  # no -0.0
        if np.abs(values[program.integral] - rounded).max(initial=0.0) <= _INTEGRAL_TOLERANCE:
            values = values.copy()
            values[program.integral] = rounded
            return Result(values=values, status="optimal")
    remaining = max(time_limit - (time.perf_counter() - start), 0.01)
    options = {"time_limit": remaining, "mip_rel_gap": 1e-7, **params}
    result = scipy.optimize.milp(
        program.cost, integrality=program.integral.astype(int),
        bounds=scipy.optimize.Bounds(np.zeros_like(program.upper), program.upper),
        constraints=scipy.optimize.LinearConstraint(program.matrix, program.row_lower, program.row_upper),
        options=options)
    if result.status == 0:
        return Result(values=result.x, status="optimal")
    if result.status == 2:
        return Result(values=None, status="infeasible")
    if result.x is None:
        return Result(values=None, status="unknown")
    return Result(values=result.x, status="feasible", gap=float(getattr(result, "mip_gap", math.nan)))


def _relaxation(program: Program, time_limit: float, params: Mapping[str, object]):
    matrix, lower, upper = program.matrix, program.row_lower, program.row_upper
    equal = lower == upper
    below = ~equal & np.isfinite(upper)
    above = ~equal & np.isfinite(lower)
    inequality = scipy.sparse.vstack([matrix[below], -matrix[above]]).tocsr()
    bounds_ub = np.concatenate([upper[below], -lower[above]])
    return scipy.optimize.linprog(
        program.cost, A_ub=inequality if inequality.shape[0] else None, b_ub=bounds_ub if len(bounds_ub) else None,
        A_eq=matrix[equal] if equal.any() else None, b_eq=lower[equal] if equal.any() else None,
        bounds=np.stack([np.zeros_like(program.upper), program.upper], axis=1), method="highs-ds",
        # HiGHS's presolve more than doubles the time of these LPs (T5 d=1024 on 2x4: 5.0 s against 2.0 s).
        options={"time_limit": time_limit, "presolve": False})


def _solve_cp_sat(program: Program, time_limit: float, num_workers: int, params: Mapping[str, object]) -> Result:
    """The same rows over integers: costs scaled and rounded, ``<=`` rows rounded conservatively."""
    model = cp_model.CpModel()
    variables = [model.NewBoolVar("") if bound <= 1 else model.NewIntVar(0, int(math.ceil(min(bound, 2.0**50))), "")
                 for bound in program.upper]
    matrix = program.matrix
    for row in range(matrix.shape[0]):
        cols = matrix.indices[matrix.indptr[row]:matrix.indptr[row + 1]]
        coefs = matrix.data[matrix.indptr[row]:matrix.indptr[row + 1]]
        lower, upper = program.row_lower[row], program.row_upper[row]
        if lower == upper:
            if not np.all(coefs == np.round(coefs)):
                raise ValueError("CP-SAT needs integer coefficients in equality rows")
            model.Add(sum(int(c) * variables[j] for j, c in zip(cols, coefs)) == int(lower))
            continue
        # Only "<=" rows carry fractional coefficients; round them so a CP-SAT solution is feasible.
        if np.isfinite(lower):
            raise ValueError("CP-SAT rows with fractional coefficients must be upper bounds only")
        model.Add(sum(int(math.ceil(c)) * variables[j] for j, c in zip(cols, coefs)) <= int(math.floor(upper)))
    if np.all(program.cost == np.round(program.cost)):
        scale = 1.0  # integer costs (a peak in memory units) stay as they are: scaling could overflow
    else:
        scale = _CP_SAT_SCALE / (float(np.abs(program.cost).sum()) or 1.0)
    model.Minimize(sum(int(round(c * scale)) * variables[j] for j, c in enumerate(program.cost) if round(c * scale)))
    for var, value in zip(variables, program.start):
        model.AddHint(var, int(round(value)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = num_workers
    solver.parameters.random_seed = 0
    solver.parameters.cp_model_presolve = False  # costs more than it saves on one-hot models
    solver.parameters.linearization_level = 2  # the full LP: level 1 stalls with a weak bound on big steps
    for key, value in params.items():
        setattr(solver.parameters, key, value)
    status = solver.Solve(model)
    if status == cp_model.INFEASIBLE:
        return Result(values=None, status="infeasible")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return Result(values=None, status="unknown")
    values = np.array([solver.Value(v) for v in variables], dtype=float)
    if status == cp_model.OPTIMAL:
        return Result(values=values, status="optimal")
    objective, bound = solver.ObjectiveValue(), solver.BestObjectiveBound()
    return Result(values=values, status="feasible", gap=abs(objective - bound) / max(abs(objective), 1e-12))
