"""The AdamW/Adam inputs of PyTorch's own optimizer tests, read from the installed torch.

``torch.testing._internal.common_optimizers`` holds the ``OptimizerInfo`` of every torch
optimizer: the constructor kwargs ``TestOptimRenewed`` (``test/test_optim.py``) runs each
contract with, the inputs that must raise, and the LR schedulers to drive them with. Importing
that module imports ``common_utils``, which needs ``expecttest`` and changes process-wide
settings (``torch.backends.disable_global_flags()``) that other tests in the same process would
trip on. So this module parses its source and evaluates only the three input functions and the
Adam entry's ``scheduler_inputs``, with minimal stand-ins for the names they use. Nothing of
torch's file is copied here; a torch whose file no longer has these functions fails the
contract tests with a clear message rather than skipping them.
"""

from __future__ import annotations

import ast
import enum
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.optim.lr_scheduler as lr_scheduler
from torch.nn import Parameter

SOURCE = Path(torch.__file__).parent / "testing" / "_internal" / "common_optimizers.py"
FUNCTIONS = (
    "optim_inputs_func_adam",
    "get_error_inputs_for_all_optims",
    "optim_error_inputs_func_adam",
)


@dataclass
class OptimizerInput:
    params: object
    kwargs: dict
    desc: str = ""


class OptimizerErrorEnum(enum.Enum):
    CONSTRUCTION_ERROR = 0
    STEP_ERROR = 1


@dataclass
class ErrorOptimizerInput:
    optimizer_error_input: OptimizerInput
    error_on: OptimizerErrorEnum = OptimizerErrorEnum.CONSTRUCTION_ERROR
    error_type: type = RuntimeError
    error_regex: str = ""


@dataclass
class Inputs:
    optim_inputs: list = field(default_factory=list)
    error_inputs: list = field(default_factory=list)
    scheduler_inputs: tuple = ()


def _namespace() -> dict:
    ns = {
        "torch": torch,
        "Parameter": Parameter,
        "Tensor": torch.Tensor,
        "OptimizerInput": lambda params, kwargs, desc="": OptimizerInput(params, kwargs, desc),
        "ErrorOptimizerInput": ErrorOptimizerInput,
        "OptimizerErrorEnum": OptimizerErrorEnum,
        "_get_device_type": lambda device: torch.device(device).type,
        "CUDA_CONFIG_GPUS": ("cuda", "xpu"),
    }
    ns.update({k: getattr(lr_scheduler, k) for k in dir(lr_scheduler) if k[0].isupper()})
    return ns


@functools.cache
def _parsed() -> tuple[dict, ast.expr | None]:
    if not SOURCE.exists():
        raise RuntimeError(f"torch's optimizer test inputs are not at {SOURCE}")
    tree = ast.parse(SOURCE.read_text())
    ns = _namespace()
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in FUNCTIONS]
    missing = set(FUNCTIONS) - {n.name for n in found}
    if missing:
        raise RuntimeError(f"{SOURCE} no longer defines {sorted(missing)}; update this module")
    exec(compile(ast.Module(body=found, type_ignores=[]), str(SOURCE), "exec"), ns)
    schedulers = None
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "OptimizerInfo"
            and node.args
            and getattr(node.args[0], "id", None) == "Adam"
        ):
            schedulers = next((k.value for k in node.keywords if k.arg == "scheduler_inputs"), None)
    return ns, schedulers


def adam_inputs(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Inputs:
    """torch's Adam/AdamW inputs (they share them). ``device="cuda"`` adds the tensor-lr and
    tensor-betas configs; their tensors are made on the CPU, so they serve CPU tests too."""
    ns, schedulers = _parsed()
    out = Inputs(
        optim_inputs=ns["optim_inputs_func_adam"](device, dtype),
        error_inputs=ns["optim_error_inputs_func_adam"]("cpu", dtype),
    )
    if schedulers is not None:
        out.scheduler_inputs = eval(compile(ast.Expression(schedulers), str(SOURCE), "eval"), ns)
    return out
