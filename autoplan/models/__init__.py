"""The autoplan model zoo: Flax linen models with optax AdamW train steps.

Every entry is a `ModelSpec` holding a module, an optimizer, the batch shapes
and a pure ``train_step(params, opt_state, batch)``::

    spec = autoplan.models.get("gpt-tiny", batch=32)
    params, opt_state = spec.init(jax.random.key(0))
    params, opt_state, loss = jax.jit(spec.train_step)(
        params, opt_state, spec.make_batch(jax.random.key(1)))

Families: `gpt` (GPT-2 style decoder), `moe` (every other MLP a top-2
mixture of experts), `wide_resnet` (Wide-ResNet with GroupNorm) and `mlp`.
Layers are submodules named ``block0``, ``block1``, ... in every family.
"""

from autoplan.models import gpt as gpt
from autoplan.models import mlp as mlp
from autoplan.models import moe as moe
from autoplan.models import wide_resnet as wide_resnet
from autoplan.models.registry import get as get
from autoplan.models.registry import names as names
from autoplan.models.spec import ModelSpec as ModelSpec
