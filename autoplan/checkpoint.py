"""Checkpoint and resume training state with orbax-checkpoint; restore onto another mesh or Plan."""

from autoplan._src.checkpoint import CheckpointError as CheckpointError
from autoplan._src.checkpoint import Checkpointer as Checkpointer
from autoplan._src.checkpoint import all_steps as all_steps
from autoplan._src.checkpoint import close as close
from autoplan._src.checkpoint import latest_step as latest_step
from autoplan._src.checkpoint import restore as restore
from autoplan._src.checkpoint import save as save
from autoplan._src.checkpoint import wait_until_finished as wait_until_finished
