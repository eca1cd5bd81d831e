"""Manual parallelization strategies as Plans: data parallel, ZeRO-1/2/3, Megatron."""

from autoplan._src.baselines import ALL as ALL
from autoplan._src.baselines import data_parallel as data_parallel
from autoplan._src.baselines import fsdp as fsdp
from autoplan._src.baselines import megatron as megatron
from autoplan._src.baselines import megatron_dp as megatron_dp
from autoplan._src.baselines import zero1 as zero1
from autoplan._src.baselines import zero2 as zero2
