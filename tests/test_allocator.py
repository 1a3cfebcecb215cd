"""The allocator policy of the command line (fewshot_nsl/allocator.py): freed memory kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fewshot_nsl import allocator
from fewshot_nsl.allocator import AllocatorPolicyError, allocator_policy

# Steps of one allocation pattern (a 64 MiB and a 16 MiB tensor, filled, then freed), as a
# training loop repeats its step: minor page faults of each step.
STEP_FAULTS = """
import resource
import torch
from fewshot_nsl.allocator import apply_allocator_policy
print(apply_allocator_policy())
def step():
    a, b = torch.ones(16 * 2**20), torch.ones(4 * 2**20)
    return a[:1] + b[:1]
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(
    allocator._glibc_mallopt() is None, reason="the policy applies to glibc only"
)


def step_faults(policy: str) -> tuple[bool, list[int]]:
    env = {**os.environ, "FEWSHOT_NSL_MALLOC": policy}
    out = subprocess.run(
        [sys.executable, "-c", STEP_FAULTS], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", [int(n) for n in out[1:]]


@pytest.mark.parametrize("value, policy", [(None, "keep"), ("keep", "keep"), ("System ", "system")])
def test_policy_from_the_environment(monkeypatch, value, policy) -> None:
    if value is None:
        monkeypatch.delenv("FEWSHOT_NSL_MALLOC", raising=False)
    else:
        monkeypatch.setenv("FEWSHOT_NSL_MALLOC", value)
    assert allocator_policy() == policy


def test_an_unknown_policy_is_an_error_naming_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("FEWSHOT_NSL_MALLOC", "jemalloc")
    with pytest.raises(AllocatorPolicyError, match="FEWSHOT_NSL_MALLOC='jemalloc'.*keep, system"):
        allocator_policy()


def test_system_policy_changes_nothing(monkeypatch) -> None:
    monkeypatch.setenv("FEWSHOT_NSL_MALLOC", "system")
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: pytest.fail("applied"))
    assert allocator.apply_allocator_policy() is False


@glibc_only
def test_kept_memory_is_reused_without_page_faults() -> None:
    """With the policy, the steps of a repeated pattern soon find their memory already mapped
    (no page faults in the last two of eight); without it every step maps its 80 MiB afresh
    and faults on each of its pages (measured: 0 against 16384-20481 faults a step)."""
    applied, kept = step_faults("keep")
    not_applied, system = step_faults("system")
    assert applied and not not_applied
    assert all(faults >= 16384 * 0.9 for faults in system[-2:]), system
    assert all(faults < 1000 for faults in kept[-2:]), kept


def test_the_command_line_refuses_an_unknown_policy() -> None:
    env = {**os.environ, "FEWSHOT_NSL_MALLOC": "bogus"}
    result = subprocess.run(
        [sys.executable, "-m", "fewshot_nsl.cli", "list", "learners"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "fewshot-nsl: error: FEWSHOT_NSL_MALLOC='bogus'" in result.stderr
    assert "Traceback" not in result.stderr
