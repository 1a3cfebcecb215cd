"""Few-shot learners sharing one protocol (:class:`Learner`): MAML (+ Meta-SGD, ANIL), static
and dynamic NSN (MAML configurations), ProtoNet; :func:`build_learner` from config."""

from fewshot_nsl.learners.base import Learner
from fewshot_nsl.learners.maml import (
    BN_POLICIES,
    MAML,
    Classifier,
    DynamicNSN,
    MAMLState,
    StaticNSN,
    select_parameters,
)
from fewshot_nsl.learners.memory import SavedTensorMeter, StepMemory
from fewshot_nsl.learners.protonet import ProtoNet
from fewshot_nsl.learners.registry import (
    build_learner,
    learner_options,
    list_learners,
    register_learner,
)

__all__ = [
    "BN_POLICIES",
    "MAML",
    "Classifier",
    "DynamicNSN",
    "Learner",
    "MAMLState",
    "ProtoNet",
    "SavedTensorMeter",
    "StaticNSN",
    "StepMemory",
    "build_learner",
    "learner_options",
    "list_learners",
    "register_learner",
    "select_parameters",
]
