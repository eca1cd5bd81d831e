"""Hand strategies' inputs pinned in the planner, against plain `jax.jit` with the same inputs.

For a Flax ``nn.MultiHeadDotProductAttention`` block and a Hugging Face GPT-2
block (``benchmarks/workloads.py``), each hand strategy of
``benchmarks/hand.py`` (plain ``jax.jit(step, in_shardings=...)``, no autoplan
code) is compiled, and the same input specs are pinned in ``autoplan.plan``:

* the program autoplan emits for that plan sends what the plan predicts
  (communication bytes within 20% of the compiled program's);
* its communication takes no longer than that of the plain ``jax.jit`` program
  XLA builds from the same input specs by itself (the planner's search holds
  what XLA's propagation does, and the emitter does not force worse).  Time,
  not bytes: at these sizes every collective's latency dominates, and the
  planner may rightly send more bytes in fewer collectives.

Communication is read from the compiled HLO and priced by the alpha-beta model
(reduce-scatters priced as XLA:GPU runs them, as the plan-quality benchmark does).
"""

import os
import sys

import jax
import pytest

import autoplan
from autoplan._src import hlo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import hand  # noqa: E402
import workloads  # noqa: E402

CLUSTER = autoplan.Cluster(**{**autoplan.clusters["a100-8x"].to_dict(), "devices_per_node": 4, "name": "a100-4x"})


def _report(compiled, mesh) -> hlo.CompiledReport:
    colls = hlo.collectives(compiled, mesh)
    return hlo.with_reduce_scatters(hlo.compiled_report(compiled, mesh, CLUSTER),
                                    hlo.sliced_all_reduces(compiled, colls), mesh, CLUSTER)


def _trimmed(spec) -> tuple:
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.parametrize("block,strategy", [
    (block, strategy) for block in workloads.BLOCKS for strategy in hand.STRATEGIES if strategy != "expert_parallel"])
def test_pinned_hand_strategy_is_predicted_honestly_and_never_slower_to_communicate_than_plain_jit(
        block, strategy, mesh):
    work = workloads.get(block)
    args = work.abstract_args()
    in_specs, _ = hand.shardings(strategy, work.train_step, args, mesh)
    plain = _report(hand.compile(strategy, work.train_step, args, mesh), mesh)
    plan = autoplan.plan(work.train_step, *args, mesh=mesh, cluster=CLUSTER, in_shardings=in_specs)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    assert [_trimmed(s) for s in jax.tree.leaves(plan.input_shardings, is_leaf=is_spec)] == \
        [_trimmed(s) for s in jax.tree.leaves(in_specs, is_leaf=is_spec)]
    program = autoplan.autoparallel(work.train_step, mesh=mesh, cluster=CLUSTER, planner=lambda *a, **k: plan)
    emitted = _report(program.lower(*args).compile(), mesh)
    predicted = plan.cost.communication_bytes
    assert predicted == pytest.approx(emitted.communication_bytes, rel=0.2, abs=4096)
    assert emitted.communication_seconds <= plain.communication_seconds * 1.02, \
        (emitted.communication_seconds, plain.communication_seconds)
