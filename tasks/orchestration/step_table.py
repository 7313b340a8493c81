"""The pipeline graph, written once. The Airflow DAG (TaskFlow in-process, or one container per step),
the in-process runner (`python -m tasks pipeline`) and the containers' entry point (`python -m tasks
step NAME`) are all generated from STEPS; no other file lists the steps or their order.

A step's `inputs` name the results it takes, in order: "conf" (the run's configuration) or an earlier
step. A mapped step runs once per item of its single input (the variants); an unmapped step that takes
a mapped step's result gets the list of its items. `backend_image` steps run in the image of the
variant's backend (only there can its quantized model be built or loaded); `gpu` steps get a GPU in
the containers and, when torch sees one, in-process. `serial` mapped steps run one instance at a time
per DAG run (each holds a whole model in memory). `retries` is the Airflow retry count: only for
steps where trying again can help (a lost node, a flaky store); bad input fails at once.

This module is light (no torch, no Airflow): the Airflow image imports it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

CONF = "conf"  # the run's configuration, the first step's input


@dataclass(frozen=True)
class Step:
    name: str
    function: str  # "module:function", called as function(ctx, *inputs)
    inputs: tuple[str, ...]
    mapped: bool = False
    family: str = "core"  # the image family (containers/images.json) when no backend decides it
    backend_image: bool = False
    gpu: bool = False
    serial: bool = False
    retries: int = 0

    def resolve(self) -> Callable[..., Any]:
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)


_STEPS = "tasks.orchestration.steps"
STEPS: tuple[Step, ...] = (
    Step("prepare", f"{_STEPS}:prepare", (CONF,)),
    Step("profile", f"{_STEPS}:profile", ("prepare",), gpu=True),
    Step("allocate", f"{_STEPS}:allocate", ("prepare", "profile")),
    Step("quantize", f"{_STEPS}:quantize", ("allocate",), mapped=True, backend_image=True, gpu=True, serial=True, retries=1),
    Step("evaluate", f"{_STEPS}:evaluate", ("quantize",), mapped=True, backend_image=True, gpu=True, serial=True, retries=1),
    Step("record", f"{_STEPS}:record", ("evaluate",), mapped=True, retries=2),
    Step("verify", f"{_STEPS}:verify", ("record",), mapped=True, backend_image=True, gpu=True, serial=True, retries=1),
    Step("finish", f"{_STEPS}:finish", ("prepare", "verify"), retries=2),
)
BY_NAME = {s.name: s for s in STEPS}


def get_step(name: str) -> Step:
    from tasks.errors import PipelineError

    if name not in BY_NAME:
        raise PipelineError(f"unknown step {name!r}: one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


def _check(steps: tuple[Step, ...]) -> None:
    """Inputs name earlier steps; a mapped step maps over exactly one list."""
    seen = {CONF}
    for step in steps:
        missing = [i for i in step.inputs if i not in seen]
        assert not missing, f"step {step.name} takes {missing} before they exist"
        assert not step.mapped or len(step.inputs) == 1, f"mapped step {step.name} must take one input"
        seen.add(step.name)


_check(STEPS)
