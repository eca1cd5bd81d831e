"""autoplan: the automatic parallelization planner for JAX."""

from autoplan import baselines as baselines
from autoplan import checkpoint as checkpoint
from autoplan import models as models
from autoplan._src.api import AUTO as AUTO
from autoplan._src.api import plan as plan
from autoplan._src.autoparallel import AutoParallel as AutoParallel
from autoplan._src.autoparallel import autoparallel as autoparallel
from autoplan._src.cluster import Cluster as Cluster
from autoplan._src.cluster import Cost as Cost
from autoplan._src.cluster import calibrate as calibrate
from autoplan._src.cluster import clusters as clusters
from autoplan._src.emit import PlanMismatchError as PlanMismatchError
from autoplan._src.intra import PlanningError as PlanningError
from autoplan._src.intra import PlanningTimeoutWarning as PlanningTimeoutWarning
from autoplan._src.pipeline import Layer as PipelineLayer
from autoplan._src.pipeline import MicrobatchError as MicrobatchError
from autoplan._src.pipeline import Pipeline as Pipeline
from autoplan._src.pipeline import Schedule as PipelineSchedule
from autoplan._src.pipeline import accumulate as accumulate
from autoplan._src.pipeline import gpt_layers as pipeline_gpt_layers
from autoplan._src.pipeline import schedule as pipeline_schedule
from autoplan._src.plan import Plan as Plan
from autoplan._src.plan import load_plan as load_plan
from autoplan._src.strategies.base import Strategy as Strategy
from autoplan._src.strategies.base import StrategyRule as StrategyRule
from autoplan._src.strategies.base import UnsupportedPrimitiveWarning as UnsupportedPrimitiveWarning
from autoplan._src.strategies.base import register_strategy as register_strategy
from autoplan._src.trace import TraceError as TraceError

__version__ = "0.1.0"
