"""Few-shot learners sharing one protocol (:class:`Learner`): MAML (+ Meta-SGD, ANIL) and its
static/dynamic NSN presets, ProtoNet; :func:`build_learner` from config.

Importing this package registers every learner (each class registers itself at its
definition with :func:`register_learner`).
"""

from fewshot_nsl.learners.base import Learner
from fewshot_nsl.learners.maml import (
    BN_POLICIES,
    MAML,
    Classifier,
    MAMLState,
    select_parameters,
)
from fewshot_nsl.learners.protonet import ProtoNet
from fewshot_nsl.learners.registry import (
    LearnerEntry,
    build_learner,
    learner_entry,
    learner_options,
    list_learners,
    register_learner,
)

__all__ = [
    "BN_POLICIES",
    "MAML",
    "Classifier",
    "Learner",
    "LearnerEntry",
    "MAMLState",
    "ProtoNet",
    "build_learner",
    "learner_entry",
    "learner_options",
    "list_learners",
    "register_learner",
    "select_parameters",
]
