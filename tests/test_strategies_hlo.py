"""Sharding rules against XLA, one operator at a time.

For each strategy of a one-operator program (attention's einsums with several
batch and free dims, projections with 3-D kernels, weight gradients, reshapes,
transposes, broadcasts, reductions), plain ``jax.jit`` is compiled with the
strategy's operand and result layouts, and the bytes of the collectives XLA
emits (reduce-scatters priced as XLA:GPU runs them, as the plan-quality
benchmark does) must equal the bytes the rule prices.  This is how the
reduce-scatter rules of `strategies.core.dot_general` were found wrong (a
scatter onto an already split dim, a scatter while a mesh axis idles, two
split contracting dims reduced apart) and fixed.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding

from autoplan._src import hlo
from autoplan._src.cluster import MeshShape, clusters
from autoplan._src.strategies import base as B
from autoplan._src.trace import trace

CLUSTER = clusters["a100-8x"]
Bn, S, H, K, D = 8, 32, 8, 16, 128


def f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


CASES = {
    # name: (one-operator function, operands)
    "scores bqhd,bkhd->bhqk": (lambda q, k: jnp.einsum("bqhd,bkhd->bhqk", q, k), (f32(Bn, S, H, K), f32(Bn, S, H, K))),
    "values bhqk,bkhd->bhqd": (lambda p, v: jax.lax.dot_general(p, v, (((3,), (1,)), ((0, 1), (0, 2)))),
                               (f32(Bn, H, S, S), f32(Bn, S, H, K))),
    "qkv projection bsd,dhk->bshk": (lambda x, w: jnp.einsum("bsd,dhk->bshk", x, w), (f32(Bn, S, D), f32(D, H, K))),
    "out projection bshk,hkd->bsd": (lambda x, w: jnp.einsum("bshk,hkd->bsd", x, w), (f32(Bn, S, H, K), f32(H, K, D))),
    "kernel gradient bsd,bshk->dhk": (lambda x, g: jnp.einsum("bsd,bshk->dhk", x, g),
                                      (f32(Bn, S, D), f32(Bn, S, H, K))),
    "reshape split heads": (lambda x: x.reshape(Bn, S, H, K), (f32(Bn, S, H * K),)),
    "reshape merge": (lambda x: x.reshape(Bn * S, H * K), (f32(Bn, S, H, K),)),
    "transpose": (lambda x: x.transpose(0, 2, 1, 3), (f32(Bn, S, H, K),)),
    "broadcast": (lambda x: jax.lax.broadcast_in_dim(x, (Bn, S, D), (0, 2)), (f32(Bn, D),)),
    "reduce": (lambda x: x.sum(axis=(1, 2)), (f32(Bn, S, H, K),)),
}
# Every other strategy on (2, 4), every third on (4, 2), to keep the suite fast.
MESHES = {(2, 4): 2, (4, 2): 3}


def _compiled_bytes(fn, args, strategy, mesh, shape):
    ins = tuple(NamedSharding(mesh, B.to_partition_spec(spec)) for spec in strategy.input_specs)
    out = NamedSharding(mesh, B.to_partition_spec(strategy.output_specs[0]))
    compiled = jax.jit(fn, in_shardings=ins, out_shardings=out).lower(*args).compile()
    colls = hlo.collectives(compiled, shape)
    report = hlo.with_reduce_scatters(hlo.compiled_report(compiled, shape, CLUSTER),
                                      hlo.sliced_all_reduces(compiled, colls), shape, CLUSTER)
    return report.communication_bytes


@pytest.mark.parametrize("mesh_shape", list(MESHES), ids=lambda m: "x".join(map(str, m)))
@pytest.mark.parametrize("case", list(CASES))
def test_rule_prices_what_xla_compiles(case, mesh_shape):
    fn, args = CASES[case]
    names = ("data", "model")
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shape = MeshShape(axis_names=names, axis_sizes=mesh_shape)
    ctx = B.Context(mesh=shape, cluster=CLUSTER)
    (op,) = [op for op in trace(fn, *args).ops if op.role not in ("input", "output", "constant")]
    strategies = B.strategies_for(op, ctx)[::MESHES[mesh_shape]]
    assert len(strategies) >= 3
    wrong = []
    for strategy in strategies:
        xla = _compiled_bytes(fn, args, strategy, mesh, shape)
        if abs(strategy.communication_bytes - xla) > 0.01 * max(strategy.communication_bytes, xla) + 64:
            wrong.append(f"{strategy.name}: rule {strategy.communication_bytes:.0f} B, XLA {xla:.0f} B")
    assert not wrong, "\n".join(wrong)
