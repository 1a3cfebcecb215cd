"""Few-shot learners sharing one protocol (:class:`Learner`)."""

from fewshot_nsl.learners.base import Learner

__all__ = ["Learner"]
