"""Baselines: mesh axes they need but the mesh lacks are refused by name (issue 9, item 7)."""

import jax
import pytest

import autoplan

SPEC = autoplan.models.get("mlp-tiny")
ARGS = (*SPEC.abstract_state(), SPEC.abstract_batch())
DATA_ONLY = jax.sharding.AbstractMesh((8,), ("data",))


@pytest.mark.parametrize("baseline,option,value,axis", [
    ("megatron", "model_axis", "model", "model"), ("megatron_dp", "model_axis", "model", "model"),
    ("megatron_dp", "data_axes", "pod", "pod"), ("fsdp", "data_axes", ("batch",), "batch"),
    ("zero1", "data_axes", ("data", "replica"), "replica"), ("data_parallel", "data_axes", ["x"], "x"),
])
def test_a_missing_mesh_axis_is_named_with_the_mesh_axes(baseline, option, value, axis):
    with pytest.raises(ValueError, match=rf"autoplan.baselines.{baseline}: mesh axis '{axis}' "
                                         rf"\({option}=.*\) is not in the mesh, whose axes are \{{'data': 8\}}"):
        getattr(autoplan.baselines, baseline)(SPEC.train_step, *ARGS, mesh=DATA_ONLY, **{option: value})


def test_one_axis_name_may_be_given_as_a_string():
    plan = autoplan.baselines.zero1(SPEC.train_step, *ARGS, mesh=DATA_ONLY, cluster="cpu", data_axes="data")
    mu = [leaf for leaf in plan.inputs if leaf.path.startswith("opt_state") and len(leaf.shape) == 2]
    assert mu and all(leaf.spec != ((), ()) for leaf in mu)  # optimizer state split over "data"
