"""FOAM in ``transformers.Trainer``: ``optimizer_cls_and_kwargs``, ``optimizers=``, the Trainer's
own optimizer with ``FOAMCallback``, and what ``torch_compile_backend`` does.

Every run trains a tiny ``LlamaForCausalLM`` built from a config (no download) on CPU for 4
steps, saving at step 2. A resumed run continues from that checkpoint and must log the very same
losses at steps 3 and 4 and end with the very same weights: the Trainer restores the data order
and RNG, and the steps run the same operations in the same order, so equality is bitwise.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
transformers = pytest.importorskip(
    "transformers", reason="needs the hf extra: pip install 'foam-compile[hf]'"
)
pytest.importorskip("accelerate", reason="needs the hf extra: pip install 'foam-compile[hf]'")

import foam_compile  # noqa: E402
from foam_compile.integrations import PolicyFOAM  # noqa: E402
from foam_compile.integrations.hf import FOAMCallback, foam_optimizer  # noqa: E402

from .common import check_levels, folded  # noqa: E402

STEPS, SAVE = 4, 2
LR, WD = 1e-2, 0.1


def make_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def dataset():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": x, "labels": x} for x in torch.randint(0, 64, (32, 16), generator=g)]


def make_args(out, **overrides):
    options = dict(
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=LR,
        weight_decay=WD,
        adam_beta2=0.95,
        save_steps=SAVE,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return transformers.TrainingArguments(str(out), **options)


def train(out, resume=None, args=None, **trainer_kwargs):
    """``(trainer, model, {step: loss})`` of one run; ``trainer_kwargs`` may be callables of the
    model (optimizers are built from it)."""
    model = make_model()
    args = args or make_args(out)
    kwargs = {k: v(model, args) if callable(v) else v for k, v in trainer_kwargs.items()}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), **kwargs)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return trainer, model, losses


def inner(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # AcceleratedOptimizer


def assert_resumes_identically(first, resumed):
    (_, model_a, losses_a), (_, model_b, losses_b) = first, resumed
    for step in range(SAVE + 1, STEPS + 1):
        assert losses_b[step] == losses_a[step], (step, losses_a, losses_b)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name


def cls_and_kwargs(model, args):
    return foam_optimizer(args, level=2)


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory):
    """The supported way in (also under FSDP): the Trainer builds PolicyFOAM from its groups."""
    out = tmp_path_factory.mktemp("policy")
    return out, train(out, optimizer_cls_and_kwargs=cls_and_kwargs)


def test_optimizer_cls_and_kwargs_takes_the_trainers_groups_and_the_policy(policy_run):
    _, (trainer, model, losses) = policy_run
    opt = inner(trainer)
    assert type(opt) is PolicyFOAM
    # The Trainer's decay / no-decay groups, kept as given, each with FOAM's options.
    assert [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0]
    assert all(g["level"] == 2 and g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 1 for p in opt.param_groups[1]["params"])
    levels = check_levels(opt.state.__getitem__, model.named_parameters())
    assert levels["model.embed_tokens.weight"] == levels["lm_head.weight"] == 0
    assert levels["model.layers.0.self_attn.q_proj.weight"] == 2
    assert levels["model.layers.1.mlp.down_proj.weight"] == 2
    assert len(names) == len(levels)
    assert len(losses) == STEPS


def test_optimizer_pt_holds_folded_state(policy_run):
    out, (_, model, _) = policy_run
    sd = torch.load(out / f"checkpoint-{SAVE}" / "optimizer.pt", weights_only=True)
    params = [p for g in sd["param_groups"] for p in g["params"]]
    by_index = dict(zip(params, [p for _, p in model.named_parameters()]))
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    (index,) = [i for i, p in by_index.items() if p is q_proj]
    assert sd["state"][index]["foam_level"] == 2
    assert tuple(sd["state"][index]["exp_avg"].shape) == folded(q_proj.shape, 2)
    assert float(sd["state"][index]["step"]) == SAVE


def test_optimizer_cls_and_kwargs_resumes_identically(policy_run, tmp_path):
    out, first = policy_run
    resumed = train(
        tmp_path, resume=out / f"checkpoint-{SAVE}", optimizer_cls_and_kwargs=cls_and_kwargs
    )
    assert type(inner(resumed[0])) is PolicyFOAM
    assert_resumes_identically(first, resumed)


def test_plain_foam_class_keeps_embedding_and_head_unfolded(tmp_path):
    def plain(model, args):
        return foam_compile.FOAM, dict(foam_optimizer(args)[1])

    trainer, model, _ = train(
        tmp_path,
        optimizer_cls_and_kwargs=plain,
        args=make_args(tmp_path, max_steps=1, save_strategy="no"),
    )
    check_levels(inner(trainer).state.__getitem__, model.named_parameters())


def converted_adamw(model, args):
    adamw = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=WD)
    return foam_compile.convert(adamw, level=2), None


def test_optimizers_tuple_with_convert_resumes_identically(tmp_path):
    first = train(tmp_path / "a", optimizers=converted_adamw)
    opt = inner(first[0])
    assert isinstance(opt, foam_compile.FOAM) and isinstance(opt, torch.optim.AdamW)
    check_levels(opt.state.__getitem__, first[1].named_parameters())
    resumed = train(
        tmp_path / "b", resume=tmp_path / "a" / f"checkpoint-{SAVE}", optimizers=converted_adamw
    )
    assert_resumes_identically(first, resumed)


def test_trainers_own_optimizer_refuses_a_foam_checkpoint_with_the_fix(policy_run, tmp_path):
    """Unconverted, the Trainer's AdamW would fail on the folded shapes inside its step;
    the guard installed by ``import foam_compile.integrations`` names the fix instead."""
    out, _ = policy_run
    with pytest.raises(RuntimeError, match=r"foam_compile\.convert.*FOAMCallback"):
        train(tmp_path, resume=out / f"checkpoint-{SAVE}")


def test_trainers_own_optimizer_with_callback_resumes_identically(policy_run, tmp_path):
    """``FOAMCallback`` converts the Trainer's AdamW after it loaded the FOAM checkpoint."""
    out, first = policy_run
    resumed = train(tmp_path, resume=out / f"checkpoint-{SAVE}", callbacks=[FOAMCallback()])
    opt = inner(resumed[0])
    assert type(opt).__name__ == "FOAMAdamW"
    check_levels(opt.state.__getitem__, resumed[1].named_parameters())
    assert_resumes_identically(first, resumed)


def test_callback_converts_the_trainers_adamw_from_the_start(tmp_path):
    trainer, model, losses = train(
        tmp_path,
        callbacks=[FOAMCallback(level=2)],
        args=make_args(tmp_path, max_steps=2, save_strategy="no"),
    )
    opt = inner(trainer)
    assert type(opt).__name__ == "FOAMAdamW"
    assert [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0]
    check_levels(opt.state.__getitem__, model.named_parameters())
    assert all(float(st["step"]) == 2 for st in opt.state.values())


def test_torch_compile_backend_foam_is_refused_by_accelerate(tmp_path):
    """accelerate maps torch_compile_backend onto its closed DynamoBackend enum. If this starts
    passing, re-check the README's "Use it with the Hugging Face Trainer" section."""
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        train(
            tmp_path,
            args=make_args(tmp_path, torch_compile_backend="foam"),
            optimizer_cls_and_kwargs=cls_and_kwargs,
        )


def test_compiled_model_with_foam_optimizer(tmp_path):
    """The working route: the Trainer compiles the model (accelerate's torch.compile of the
    model; aot_eager here, the same AOTAutograd path as the default Inductor without its
    compile time), and FOAM steps the optimizer; names still reach the policy."""
    args = make_args(
        tmp_path,
        max_steps=2,
        save_strategy="no",
        torch_compile=True,
        torch_compile_backend="aot_eager",
    )
    trainer, model, losses = train(tmp_path, args=args, optimizer_cls_and_kwargs=cls_and_kwargs)
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    check_levels(inner(trainer).state.__getitem__, model.named_parameters())
    assert len(losses) == 2 and all(map(torch.isfinite, map(torch.tensor, losses.values())))
