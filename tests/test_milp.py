"""The MILP backends against brute force and against each other."""

import itertools

import numpy as np
import pytest

import autoplan
from autoplan._src import intra, milp
from autoplan._src import cluster as C
from autoplan._src.strategies import base as S
from autoplan._src.trace import trace


def _knapsack() -> milp.Program:
    """max 5a + 4b + 3c with 2a + 3b + c <= 4: the LP optimum (a, b, c) = (1, 1/3, 1) is fractional."""
    rows = milp.Rows()
    x = rows.add_variables(3, integral=True, cost=[-5.0, -4.0, -3.0])
    rows.add_row(x, [2.0, 3.0, 1.0], upper=4.0)
    return rows.build()


def _brute_force(program: milp.Program) -> float:
    best = np.inf
    for values in itertools.product([0, 1], repeat=len(program.cost)):
        values = np.array(values, float)
        activity = program.matrix @ values
        if np.all(activity <= program.row_upper + 1e-9) and np.all(activity >= program.row_lower - 1e-9):
            best = min(best, float(program.cost @ values))
    return best


@pytest.mark.parametrize("solver", ["highs", "cp-sat"])
def test_a_fractional_relaxation_is_branched_to_the_integer_optimum(solver):
    program = _knapsack()
    result = milp.solve(program, solver=solver, time_limit=10)
    assert result.status == "optimal"
    assert float(program.cost @ result.values) == _brute_force(program) == -8.0  # a and c
    assert np.array_equal(result.values, np.round(result.values))


@pytest.mark.parametrize("solver", ["highs", "cp-sat"])
def test_an_infeasible_program_says_so(solver):
    rows = milp.Rows()
    x = rows.add_variables(2, integral=True)
    rows.add_row(x, [1.0, 1.0], lower=1.0, upper=1.0)
    rows.add_row(x, [1.0, 1.0], upper=0.5)
    assert milp.solve(rows.build(), solver=solver, time_limit=10).status == "infeasible"


def test_unknown_solver_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'highs', 'cp-sat'"):
        milp.solve(_knapsack(), solver="cbc")


@pytest.mark.parametrize("model, budget_gib", [("gpt-tiny", None), ("mlp-small", 29.95 / 1024)])
def test_highs_and_cp_sat_find_the_same_optimum_of_a_zoo_step(model, budget_gib):
    """Two independent solvers of the same ILP, one from a simplex, one from CP-SAT's search."""
    spec = autoplan.models.get(model)
    graph = trace(spec.train_step, *spec.abstract_state(), spec.abstract_batch())
    ctx = S.Context(mesh=C.MeshShape(axis_names=("data", "model"), axis_sizes=(2, 4)),
                    cluster=autoplan.clusters["a100-8x"])
    budget = None if budget_gib is None else budget_gib * 2**30
    problem = intra.build_problem(graph, ctx)
    found = {solver: intra.solve(problem, intra.SolveOptions(memory_budget=budget, solver=solver))
             for solver in ("highs", "cp-sat")}
    assert {s.status for s in found.values()} == {"optimal"}
    highs, cp_sat = found["highs"].objective_seconds, found["cp-sat"].objective_seconds
    if budget is None:
        # CP-SAT rounds costs to a billionth of their sum; both reach the same optimum.
        assert highs == pytest.approx(cp_sat, rel=1e-6)
    else:
        # CP-SAT also rounds each memory coefficient up (to a ten-millionth of the budget), which
        # shrinks its feasible set a little: its optimum may only be above HiGHS's, and by little.
        assert cp_sat * (1 - 1e-4) <= highs <= cp_sat * (1 + 1e-9)
        assert max(s.peak_memory for s in found.values()) <= budget < intra.solve(problem).peak_memory  # it binds


def test_the_least_memory_any_plan_needs_is_the_same_for_both_solvers():
    """`intra.minimum_memory` minimises an unbounded peak variable: both backends take it and agree."""
    spec = autoplan.models.get("mlp-small")
    graph = trace(spec.train_step, *spec.abstract_state(), spec.abstract_batch())
    ctx = S.Context(mesh=C.MeshShape(axis_names=("data", "model"), axis_sizes=(2, 4)),
                    cluster=autoplan.clusters["a100-8x"])
    problem = intra.build_problem(graph, ctx)
    need = {solver: intra.minimum_memory(problem, intra.SolveOptions(memory_budget=1.0, solver=solver))
            for solver in ("highs", "cp-sat")}
    # CP-SAT rounds each tensor's per-device bytes up to a whole byte.
    assert need["highs"] == pytest.approx(need["cp-sat"], rel=1e-6), need
