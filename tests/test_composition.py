"""Every combination of metakit's parts gives the exact meta-gradient or a clear metakit refusal.

The grid: executor (Sequential, Vmap, Distributed over one process, Distributed(local=Vmap()); over
two gloo processes in the slow part) × strategy (every exact mode, FirstOrder, Truncated, Reptile,
Implicit) × cut (none, declared) × learned rates × buffer policy × precision (fp32, bf16), on an
MLP with BatchNorm under a head and on a tiny BERT with the top adapter through ``cut="auto"``.
Each cell equals its reference — Sequential, no cut, fp32, with the same strategy (the memory-lean
modes: with ``SecondOrder()``) — to 1e-9 in float64 (bf16: cosine ≥ 0.999 to the float32
reference), or is refused by a metakit error. The test prints the counts.
"""

from __future__ import annotations

import itertools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torchopt
from torch import nn
from transformers import BertConfig, BertForTokenClassification

import metakit as mk
from metakit import recipes
from metakit.executors import Distributed, Sequential, Vmap
from metakit.peft import add_top_adapter, head_spec

EXACT = [
    mk.SecondOrder(),
    mk.SecondOrder(hvp="forward"),
    mk.SecondOrder(checkpoint=2),
    mk.SecondOrder(hvp="forward", checkpoint=2),
]
STRATEGIES = [
    *EXACT,
    mk.FirstOrder(),
    mk.Truncated(1),
    mk.Reptile(),
    mk.Implicit(lam=1.0, cg_steps=8, residual_tol=1e9),  # exactness of the composition, not of the solve
]
BUFFERS = ["update", "task", "frozen"]


def executors():
    return {
        "Sequential": Sequential(),
        "Vmap": Vmap(),
        "Distributed": Distributed(),  # over the process group of the test: one process, or two
        "Distributed(local=Vmap)": Distributed(local=Vmap()),
    }


# -- the two models -------------------------------------------------------------------------------
class BatchNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x))


def mlp_loss(forward, batch):
    x, y = batch
    return ((forward(x) - y) ** 2).mean()


def mlp_cut():
    return mk.Cut(at="head", rest=lambda run, features, x: run("head")(features))


def mlp_case(dtype):
    torch.manual_seed(0)
    model = BatchNormMLP().to(dtype)
    with torch.no_grad():  # running statistics that differ from any batch's
        model.body[1].running_mean.uniform_(-0.5, 0.5)
        model.body[1].running_var.uniform_(0.5, 2.0)
    generator = torch.Generator().manual_seed(1)

    def batch():
        x = torch.randn(6, 3, generator=generator, dtype=dtype)
        return x, torch.randn(6, 2, generator=generator, dtype=dtype)

    tasks = [mk.Task(batch(), batch()) for _ in range(3)]

    def learner(strategy, executor, *, cut, learn_lr, buffers, precision):
        return mk.MetaLearner(
            model,
            mlp_loss,
            inner=mk.InnerLoop(
                mk.select("head.*"), torchopt.sgd(lr=0.3), steps=3, learn_lr=learn_lr, buffers=buffers
            ),
            outer_params=mk.everything(),
            strategy=strategy,
            executor=executor,
            cut=mlp_cut() if cut else None,
            precision=precision,
        )

    return model, tasks, learner


TINY_BERT = dict(
    num_hidden_layers=1,
    hidden_size=16,
    num_attention_heads=2,
    intermediate_size=32,
    vocab_size=40,
    max_position_embeddings=16,
    num_labels=3,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def bert_loss(forward, batch):
    return forward(**batch).loss


def bert_case(dtype):
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(**TINY_BERT)).to(dtype).eval()
    adapter = add_top_adapter(model, bottleneck=4)
    head = head_spec(model)
    generator = torch.Generator().manual_seed(2)

    def batch():
        ids = torch.randint(5, 40, (2, 6), generator=generator)
        return {"input_ids": ids, "labels": torch.randint(0, 3, (2, 6), generator=generator)}

    tasks = [mk.Task(batch(), batch()) for _ in range(2)]

    def learner(strategy, executor, *, cut, learn_lr, buffers, precision):
        # Meta-Adapters' partition: adapter and head adapt; the adapter is meta-learned (outer ⊆ inner).
        return recipes.meta_adapters(
            model,
            bert_loss,
            adapters=adapter,
            head=head,
            steps=2,
            inner_lr=0.3,
            strategy=strategy,
            executor=executor,
            learn_lr=learn_lr,
            buffers=buffers,
            precision=precision,
            cut="auto" if cut else None,
        )

    return model, tasks, learner


CASES = {"bn-mlp": mlp_case, "bert-top-adapter": bert_case}


# -- one cell ---------------------------------------------------------------------------------------
def metakit_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("metakit")


def meta_gradient(case, dtype, strategy, executor, **settings):
    """The flat meta-gradient of one meta-step, or the metakit error that refused it."""
    model, tasks, build = CASES[case](dtype)
    try:
        learner = build(strategy, executor, **settings)
        model.zero_grad()
        learner.meta_step(tasks)
    except Exception as error:
        if metakit_error(error):
            return error
        raise AssertionError(
            f"{case} {strategy!r} {executor!r} {settings}: a raw {type(error).__name__} from inside: {error}"
        ) from error
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    grads += [s.grad.flatten() for s in learner.lr_scales.values() if s.grad is not None]
    return torch.cat(grads).double()


def reference_strategy(strategy):
    return mk.SecondOrder() if any(repr(strategy) == repr(e) for e in EXACT) else strategy


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, so Distributed runs in this process."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=0, world_size=1
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


def run_grid(case, executor_names):
    counts = {"exact": 0, "refused": 0} | {name: 0 for name in executor_names}
    references: dict = {}
    for strategy, learn_lr, buffers in itertools.product(STRATEGIES, [False, True], BUFFERS):
        for precision, dtype in (("fp32", torch.float64), ("bf16", torch.float32)):
            key = (repr(reference_strategy(strategy)), learn_lr, buffers, dtype)
            if key not in references:
                references[key] = meta_gradient(
                    case,
                    dtype,
                    reference_strategy(strategy),
                    Sequential(),
                    cut=False,
                    learn_lr=learn_lr,
                    buffers=buffers,
                    precision="fp32",
                )
            reference = references[key]
            for name, cut in itertools.product(executor_names, [False, True]):
                settings = dict(cut=cut, learn_lr=learn_lr, buffers=buffers, precision=precision)
                got = meta_gradient(case, dtype, strategy, executors()[name], **settings)
                where = f"{case} {strategy!r} on {name} {settings}"
                if isinstance(got, Exception):
                    counts["refused"] += 1
                    assert str(got).strip(), where
                    continue
                assert isinstance(reference, torch.Tensor), (
                    f"{where} ran, but its reference (Sequential, no cut, fp32) was refused: {reference}"
                )
                if precision == "fp32":
                    scale = max(1.0, float(reference.abs().max()))
                    difference = float((got - reference).abs().max())
                    assert difference <= 1e-9 * scale, (
                        f"{where}: differs from the reference by {difference:.3g}"
                    )
                else:
                    cosine = float(torch.nn.functional.cosine_similarity(got, reference, dim=0))
                    assert cosine >= 0.999, f"{where}: cosine {cosine:.5f} to the fp32 reference"
                counts["exact"] += 1
                counts[name] += 1
    return counts


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_combination_is_exact_or_refused(case, process_group):
    counts = run_grid(case, list(executors()))
    print(f"\n{case}: {counts['exact']} exact, {counts['refused']} refused by a metakit error (one process)")
    assert all(counts[name] > 0 for name in executors()), counts  # every executor ran exact cells


def two_process_worker(rank: int, init_file: str, out_dir: str) -> None:
    measured: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        names = ["Distributed", "Distributed(local=Vmap)"]
        measured["counts"] = {case: run_grid(case, names) for case in sorted(CASES)}
    except BaseException:  # reported by spawn_ranks with the traceback
        import traceback

        measured["crash"] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.save(measured, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_every_combination_on_two_processes_is_exact_or_refused():
    from spawned_ranks import spawn_ranks

    ranks = spawn_ranks(two_process_worker, 2)
    for case, counts in ranks[0]["counts"].items():
        print(
            f"\n{case}: {counts['exact']} exact, {counts['refused']} refused by a metakit error (two processes)"
        )
        assert counts["Distributed"] > 0 and counts["Distributed(local=Vmap)"] > 0, counts
    assert ranks[0]["counts"] == ranks[1]["counts"]


@pytest.mark.parametrize(
    "strategy, executor, settings, message",
    [
        (mk.Implicit(), Vmap(), {}, r"Vmap\(\).*Implicit.*Instead: executors\.Sequential"),
        (
            mk.SecondOrder(),
            Vmap(),
            {"buffers": "update"},
            r"buffers='update'.*Instead: InnerLoop\(buffers='task'\)",
        ),
        (
            mk.FirstOrder(),
            Sequential(),
            {"learn_lr": True},
            r"learn_lr=True.*FirstOrder.*Instead: SecondOrder",
        ),
        (mk.SecondOrder(), Distributed(local=Vmap()), {"buffers": "update"}, r"buffers='update'.*Vmap\(\)"),
    ],
    ids=["implicit-vmap", "vmap-update-bn", "first-order-learned-rates", "distributed-vmap-update-bn"],
)
def test_refusals_name_the_combination_and_what_works(strategy, executor, settings, message):
    _, _, build = mlp_case(torch.float64)
    options = dict(cut=False, learn_lr=False, buffers="task", precision="fp32") | settings
    with pytest.raises(mk.CompositionError, match=message):
        build(strategy, executor, **options)


def test_fp16_is_refused_where_the_executor_does_not_scale_its_gradients():
    # fp16 itself needs CUDA (the learner refuses it on CPU first); the composition rule is checked here.
    from metakit.capabilities import check_composition

    for executor in (Vmap(), Distributed(local=Vmap())):
        with pytest.raises(mk.CompositionError, match=r"precision='fp16'.*Instead: precision='bf16'"):
            check_composition(mk.SecondOrder(), executor, precision="fp16")
    check_composition(mk.SecondOrder(hvp="forward"), Distributed(), precision="fp16")  # scaled: allowed


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_query_loss_before_adaptation_is_the_same_on_every_executor(case, process_group):
    # The measurement a logger switches on (MetaStepResult.query_losses_before) composes like the
    # meta-gradient: every executor, with a cut, under the "frozen" policy (running statistics).
    measured = {}
    for name, executor in executors().items():
        _, tasks, build = CASES[case](torch.float64)
        learner = build(
            mk.SecondOrder(), executor, cut=True, learn_lr=False, buffers="frozen", precision="fp32"
        )
        result = learner.meta_step(tasks, query_loss_before=True)
        measured[name] = (result.query_losses_before, result.query_losses)
    reference_before, reference_after = measured["Sequential"]
    assert reference_before.shape == (len(tasks),)
    for name, (before, after) in measured.items():
        torch.testing.assert_close(before, reference_before, rtol=1e-9, atol=1e-12, msg=name)
        torch.testing.assert_close(after, reference_after, rtol=1e-9, atol=1e-12, msg=name)
