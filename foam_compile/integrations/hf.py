"""FOAM in the Hugging Face ``transformers.Trainer``, without patching it.

Two ways in, both of which also work under FSDP (the Trainer refuses ``optimizers=`` there):

- ``Trainer(..., optimizer_cls_and_kwargs=foam_optimizer(args, level=2, scale=0.25))``: the
  Trainer builds :class:`~foam_compile.FOAM` from its own decay/no-decay param groups; the
  policy keeps the embedding, ``lm_head`` and norms at level 0.
- ``Trainer(..., callbacks=[FOAMCallback()])``: the Trainer builds its usual AdamW, and the
  callback converts it in place (``foam_compile.convert``) when training begins, after a
  checkpoint's optimizer state was loaded. This also resumes a FOAM checkpoint with the
  Trainer's own optimizer.

``TrainingArguments(torch_compile_backend="foam")`` cannot work: accelerate turns the string
into its closed ``DynamoBackend`` enum (``ValueError: 'FOAM' is not a valid DynamoBackend``),
and it compiles only the model, never the optimizer step, which is what the ``"foam"`` backend
rewrites. Compile the model with ``torch_compile=True`` (Inductor) and use FOAM as above.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor
from transformers import TrainerCallback

from ..convert import convert
from ..optimizer import FOAM
from ..policy import KEEP_UNFOLDED

__all__ = ["FOAMCallback", "foam_optimizer"]


def foam_optimizer(
    args=None,
    *,
    level: int | str = 2,
    scale: float = 1.0,
    res_scale: float = 1.0,
    levels: Mapping[str | Tensor, int] | None = None,
    keep_unfolded: Iterable[str] | None = KEEP_UNFOLDED,
    **foam_options: Any,
) -> tuple[type[FOAM], dict[str, Any]]:
    """The ``(cls, kwargs)`` pair for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``args`` (``TrainingArguments``) supplies ``lr``, ``betas``, ``eps`` and ``weight_decay``
    as the Trainer's AdamW would get them (the no-decay group keeps its ``weight_decay=0``);
    ``foam_options`` override them or add any other ``FOAM`` argument. Names for the policy come
    from the live model: the Trainer pops a ``model`` key from these kwargs, so none is passed.
    """
    kwargs: dict[str, Any] = {}
    if args is not None:
        kwargs.update(
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
    kwargs.update(level=level, scale=scale, res_scale=res_scale)
    if levels is not None:
        kwargs["levels"] = levels
    if keep_unfolded is not KEEP_UNFOLDED:
        kwargs["keep_unfolded"] = keep_unfolded
    if "model" in foam_options:
        raise ValueError(
            "foam_optimizer: model= cannot go through optimizer_cls_and_kwargs (the Trainer "
            "replaces the param groups with kwargs['model']); leave it out: names come from "
            "the live model."
        )
    kwargs.update(foam_options)
    return FOAM, kwargs


class FOAMCallback(TrainerCallback):
    """Converts the Trainer's own AdamW/Adam to FOAM when training begins.

    ``on_train_begin`` runs after ``resume_from_checkpoint`` loaded ``optimizer.pt`` into the
    optimizer, so folded moments from a FOAM checkpoint are kept at their saved levels and a
    stock AdamW checkpoint's moments are folded. ``convert_options`` go to
    :func:`foam_compile.convert` (``level``, ``scale``, ``levels``, ...).
    """

    def __init__(self, **convert_options: Any):
        self.convert_options = convert_options

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        if opt is None or isinstance(opt, FOAM):
            return
        options = dict(self.convert_options)
        options.setdefault("model", model)
        convert(opt, **options)
