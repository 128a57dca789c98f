"""The block-reconstruction harness (llmcq.recon) on toy blocks whose optimum is known:
it recovers a planted scale (epochs and sampled iterations), keeps the module's own
parameters, trains in float32 with AMP off (bf16 autocast on CUDA), quantizes linear inputs
with straight-through rounding, rolls back a non-finite epoch, carries the float chain under
quant_out, and under two gloo ranks averages the gradients (both ranks end equal, and equal
to the mean-gradient schedule computed here by hand)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from llmcq import recon
from llmcq.pipeline.blockwise import Block, BlockInputs
from llmcq.quant.spec import ActQuantSpec, PerToken


class Toy(nn.Module):
    """``y = lin(x * g)``: a linear with a per-channel input gain (a norm's weight)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(d))
        self.lin = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, **_kw: Any) -> torch.Tensor:
        return self.lin(x * self.g)


def toy_block(seed: int = 0, d: int = 8) -> Block:
    torch.manual_seed(seed)
    return Block(0, "toy.0", Toy(d), [])


def batches(n: int, seed: int = 1, d: int = 8, bs: int = 2, length: int = 16) -> BlockInputs:
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(bs, length, d, generator=g) for _ in range(n)]
    return BlockInputs(hidden, [{} for _ in hidden])


def planted(block: Block, inputs: BlockInputs, s_true: torch.Tensor) -> recon.Targets:
    """Targets of the block with its weight's columns scaled by ``s_true``."""
    w = block.module.lin.weight.detach() * s_true.view(1, -1)
    return recon.Targets([torch.nn.functional.linear(h, w) for h in inputs.hidden])


def scale_params(s: torch.Tensor):  # type: ignore[no-untyped-def]
    def params(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        eff = dict(base)
        eff["lin.weight"] = base["lin.weight"] * s.view(1, -1)
        return eff
    return params


S_TRUE = torch.tensor([0.5, 1.5, 2.0, 0.8, 1.2, 0.3, 1.0, 2.5])


@pytest.mark.parametrize("mode", ["epochs", "iterations"])
def test_recovers_a_planted_scale_and_leaves_the_module_alone(mode: str) -> None:
    block, inputs = toy_block(), batches(4)
    targets = planted(block, inputs, S_TRUE)
    before = {n: p.detach().clone() for n, p in block.module.named_parameters()}
    flags = {n: p.requires_grad for n, p in block.module.named_parameters()}
    s = nn.Parameter(torch.ones(8))
    settings = (recon.ReconSettings(epochs=150) if mode == "epochs" else
                recon.ReconSettings(iterations=600, batch_size=3, log_every=100, seed=3))
    res = recon.reconstruct(block, inputs, targets, [recon.ParamGroup([s], lr=0.05)],
                            settings=settings, params=scale_params(s))
    assert torch.allclose(s.detach(), S_TRUE, atol=2e-2), s
    assert res.last < 1e-4 < res.first and not res.rolled_back and not res.amp
    assert len(res.losses) == (150 if mode == "epochs" else 6)
    assert res.steps == (150 * 4 if mode == "epochs" else 600)
    for n, p in block.module.named_parameters():  # never written, flags restored
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n], n
    assert not s.requires_grad and s.grad is None


def test_param_groups_lr_and_weight_decay_reach_the_optimizer() -> None:
    block, inputs = toy_block(), batches(2)
    targets = planted(block, inputs, S_TRUE)
    a, b = nn.Parameter(torch.ones(8)), nn.Parameter(torch.ones(8))
    seen: dict[str, Any] = {}

    def factory(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        seen["groups"] = [(g["lr"], g.get("weight_decay")) for g in groups]
        return torch.optim.SGD(groups, lr=0.0)

    def params(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**base, "lin.weight": base["lin.weight"] * (a * b).view(1, -1)}

    recon.reconstruct(block, inputs, targets,
                      [recon.ParamGroup([a], lr=0.1), recon.ParamGroup([], lr=9.0),
                       recon.ParamGroup([b], lr=0.2, weight_decay=0.5)],
                      settings=recon.ReconSettings(epochs=1, optimizer=factory), params=params)
    assert seen["groups"] == [(0.1, None), (0.2, 0.5)]  # empty groups are dropped


def test_amp_off_trains_in_float32() -> None:
    block, inputs = toy_block(), batches(2)
    targets = planted(block, inputs, S_TRUE)
    dtypes: list[torch.dtype] = []
    block.module.lin.register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
    s = nn.Parameter(torch.ones(8))
    # amp asked for on the CPU: ignored (bf16 autocast is for CUDA only)
    res = recon.reconstruct(block, inputs, targets, [recon.ParamGroup([s], lr=0.01)],
                            settings=recon.ReconSettings(epochs=1, amp=True),
                            params=scale_params(s))
    assert not res.amp and dtypes == [torch.float32, torch.float32]


@pytest.mark.gpu
def test_amp_on_cuda_autocasts_to_bfloat16() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    block, inputs = toy_block(), batches(2)
    block.module.cuda()
    inputs = BlockInputs([h.cuda() for h in inputs.hidden], inputs.kwargs)
    targets = planted(block, inputs, S_TRUE.cuda())
    dtypes: list[torch.dtype] = []
    block.module.lin.register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
    s = nn.Parameter(torch.ones(8, device="cuda"))
    for amp, want in ((True, torch.bfloat16), (False, torch.float32)):
        dtypes.clear()
        res = recon.reconstruct(block, inputs, targets, [recon.ParamGroup([s], lr=0.01)],
                                settings=recon.ReconSettings(epochs=1, amp=amp),
                                params=scale_params(s))
        assert res.amp == amp and set(dtypes) == {want}


def test_act_fake_quant_values_and_straight_through_gradient() -> None:
    from llmcq.quant.qparams import fake_quantize_act

    spec = ActQuantSpec(bits=8, symmetric=True, granularity=PerToken())
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = recon.act_fake_quant(x, spec, ste=True)
    assert torch.equal(y.detach(), fake_quantize_act(x.detach(), spec))
    y.sum().backward()
    assert x.grad is not None
    argmax = x.detach().abs().reshape(-1, 16).argmax(-1)
    mask = torch.ones(15, 16, dtype=torch.bool)
    mask[torch.arange(15), argmax] = False
    # straight through: d x_hat / d x = 1 away from the range-setting element
    assert torch.allclose(x.grad.reshape(-1, 16)[mask], torch.ones(int(mask.sum())))
    x.grad = None
    recon.act_fake_quant(x, spec, ste=False).sum().backward()
    assert torch.equal(x.grad.reshape(-1, 16)[mask], torch.zeros(int(mask.sum())))


def test_act_quant_hooks_quantize_linear_inputs_while_training() -> None:
    block, inputs = toy_block(), batches(2)
    targets = planted(block, inputs, S_TRUE)
    seen: list[torch.Tensor] = []
    block.module.lin.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    g = nn.Parameter(torch.ones(8))  # upstream of the quantizer: reached only through STE

    def params(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**base, "g": g}

    spec = ActQuantSpec(bits=2, symmetric=False, granularity=PerToken())
    recon.reconstruct(block, inputs, targets, [recon.ParamGroup([g], lr=0.01)],
                      settings=recon.ReconSettings(epochs=1), params=params,
                      act=recon.ActQuant(spec, ste=True, linears={"lin": block.module.lin}))
    assert seen and all(len(torch.unique(row)) <= 4 for x in seen for row in x.reshape(-1, 8))
    assert not torch.equal(g.detach(), torch.ones(8))  # the STE gradient moved it
    seen.clear()
    block.module(inputs.hidden[0])  # hooks removed after training
    assert len(torch.unique(seen[0].reshape(-1, 8)[0])) == 8


def test_non_finite_loss_rolls_back_to_the_previous_epoch() -> None:
    block, inputs = toy_block(), batches(2)
    targets = planted(block, inputs, S_TRUE)
    s = nn.Parameter(torch.ones(8))
    calls = [0]
    after_epoch1: list[torch.Tensor] = []

    def loss(out: torch.Tensor, batch: recon.Batch) -> torch.Tensor:
        calls[0] += 1
        value = recon.mse(out, batch.target)
        return value * float("nan") if calls[0] > 4 else value  # epoch 3 goes NaN

    def after() -> None:
        if calls[0] == 4:
            after_epoch1.append(s.detach().clone())

    res = recon.reconstruct(block, inputs, targets, [recon.ParamGroup([s], lr=0.05)],
                            settings=recon.ReconSettings(epochs=5), params=scale_params(s),
                            loss=loss, after_step=after)
    assert res.rolled_back and len(res.losses) == 3 and res.losses[-1] != res.losses[-1]
    assert torch.equal(s.detach(), after_epoch1[0])  # the tensors after epoch 2
    assert not torch.equal(s.detach(), torch.ones(8))


def test_float_chain_under_quant_out() -> None:
    torch.manual_seed(0)
    b0, b1 = Block(0, "m.0", Toy(), []), Block(1, "m.1", Toy(), [])
    x = batches(2)
    chain = recon.FloatChain()
    t0 = chain.targets(b0, x, quant_out=True, aug_loss=True, keep_inputs=True)
    with torch.no_grad():
        f0 = [b0.module(h) for h in x.hidden]
    assert all(torch.equal(a, b) for a, b in zip(t0.target, f0, strict=True))
    assert t0.aug is t0.target and t0.float_hidden is not None
    xq = BlockInputs([h + 0.1 for h in f0], x.kwargs)  # the engine's quantized chain
    t1 = chain.targets(b1, xq, quant_out=True, aug_loss=True)
    with torch.no_grad():
        assert all(torch.equal(a, b1.module(f)) for a, f in zip(t1.target, f0, strict=True))
        assert t1.aug is not None
        assert all(torch.equal(a, b1.module(h)) for a, h in zip(t1.aug, xq.hidden, strict=True))
    t = recon.FloatChain().targets(b1, xq, quant_out=False, aug_loss=False)
    assert t.aug is None and torch.equal(t.target[0], b1.module(xq.hidden[0]).detach())


def test_losses() -> None:
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.isclose(recon.mse(a, b), ((a - b) ** 2).mean())
    assert recon.neg_log_cosine(a, a).abs() < 1e-6 and recon.neg_log_cosine(a, b) > 0
    p = torch.softmax(torch.randn(2, 3, 5), -1)
    q = torch.softmax(torch.randn(2, 3, 5), -1)
    assert recon.kl_divergence(p, p).abs() < 1e-6 and recon.kl_divergence(p, q) > 0
    batch = recon.Batch(a, {}, b, aug=a)
    assert torch.isclose(recon.TargetLoss()(a, batch), recon.mse(a, b))  # + mse(a, a) = 0
    out = torch.zeros(4, 8)
    both = recon.mse(out, b) + recon.mse(out, a)
    assert torch.isclose(recon.TargetLoss(aug="sum")(out, batch), both)
    assert torch.isclose(recon.TargetLoss(aug="mean")(out, batch), both / 2)


def test_settings_and_sampling_are_checked() -> None:
    with pytest.raises(ValueError, match="not both"):
        recon.ReconSettings(epochs=1, iterations=1)
    with pytest.raises(ValueError, match="optimizer"):
        recon.ReconSettings(optimizer="sgd")
    with pytest.raises(ValueError, match="lr_schedule 'step'; allowed: constant, cosine"):
        recon.ReconSettings(lr_schedule="step")
    block = toy_block()
    inputs = BlockInputs([torch.randn(2, 4, 8)] * 2, [{"m": torch.ones(2, 4)}] * 2)
    s = nn.Parameter(torch.ones(8))
    with pytest.raises(ValueError, match="keyword inputs"):
        recon.reconstruct(block, inputs, recon.Targets(list(inputs.hidden)),
                          [recon.ParamGroup([s], lr=0.1)],
                          settings=recon.ReconSettings(iterations=2), params=scale_params(s))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_factor_follows_torch_schedulers(schedule: str) -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.3)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=0.0)
             if schedule == "cosine" else
             torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=7))
    for t in range(8):
        assert math.isclose(opt.param_groups[0]["lr"], 0.3 * recon.lr_factor(schedule, t, 7),
                            rel_tol=1e-9, abs_tol=1e-12), t
        opt.step()
        sched.step()
    assert recon.lr_factor("constant", 5, 7) == 1.0


def test_signsgd_schedule_moves_each_step_by_the_scheduled_rate() -> None:
    """A target far away keeps the gradient's sign fixed: signed descent with a linearly
    decaying rate moves the scale by exactly lr * sum_t (1 - t / T)."""
    block, inputs = toy_block(), batches(1)
    targets = planted(block, inputs, torch.full((8,), 100.0))
    s = nn.Parameter(torch.ones(8))
    res = recon.reconstruct(block, inputs, targets, [recon.ParamGroup([s], lr=0.01)],
                            settings=recon.ReconSettings(iterations=20, batch_size=2,
                                                         optimizer="signsgd",
                                                         lr_schedule="linear"),
                            params=scale_params(s))
    moved = 0.01 * sum(1 - t / 20 for t in range(20))
    assert res.steps == 20
    assert torch.allclose(s.detach(), torch.full((8,), 1.0 + moved), atol=1e-6), s


def test_keep_best_ends_with_the_tensors_of_the_lowest_step_loss() -> None:
    """Signed descent with a constant large rate overshoots and oscillates around the
    optimum: the last tensors are not the best ones, and keep_best returns those that gave
    the lowest loss of any step (recorded here as the loss saw them)."""
    block, inputs = toy_block(), batches(2)
    targets = planted(block, inputs, S_TRUE)
    s = nn.Parameter(torch.ones(8))
    seen: list[tuple[float, torch.Tensor]] = []

    def loss(out: torch.Tensor, batch: recon.Batch) -> torch.Tensor:
        value = recon.mse(out, batch.target)
        seen.append((float(value.detach()), s.detach().clone()))
        return value

    res = recon.reconstruct(block, inputs, targets, [recon.ParamGroup([s], lr=0.3)],
                            settings=recon.ReconSettings(epochs=10, optimizer="signsgd",
                                                         keep_best=True),
                            params=scale_params(s), loss=loss)
    best = min(range(len(seen)), key=lambda i: seen[i][0])
    assert res.best_step == best and res.best_loss == pytest.approx(seen[best][0])
    assert torch.equal(s.detach(), seen[best][1])
    assert best < len(seen) - 1 and seen[-1][0] > seen[best][0]  # the last was worse
    plain = recon.reconstruct(block, inputs, targets, [recon.ParamGroup([s], lr=0.3)],
                              settings=recon.ReconSettings(epochs=1), params=scale_params(s))
    assert plain.best_step is None and plain.best_loss is None


WORKER = textwrap.dedent(r'''
    import sys
    import torch
    import torch.distributed as D
    from torch import nn
    rank, world, rdv, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    D.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    from llmcq import recon
    from llmcq.pipeline.blockwise import Block, BlockInputs
    torch.manual_seed(0)
    lin = nn.Linear(8, 8, bias=False)
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin
        def forward(self, x, **kw):
            return self.lin(x)
    data = torch.load(sys.argv[5])
    mine = data["hidden"][rank::world]  # the engine's sharding: 3 batches -> 2 and 1
    inputs = BlockInputs(mine, [{} for _ in mine])
    targets = recon.Targets(data["target"][rank::world])
    s = nn.Parameter(torch.ones(8))
    def params(base):
        return {**base, "lin.weight": base["lin.weight"] * s.view(1, -1)}
    signed = len(sys.argv) > 6
    settings = (recon.ReconSettings(epochs=3, optimizer="signsgd", lr_schedule="linear",
                                    keep_best=True) if signed else recon.ReconSettings(epochs=3))
    res = recon.reconstruct(Block(0, "t.0", Toy(), []), inputs, targets,
                            [recon.ParamGroup([s], lr=0.05)], settings=settings, params=params)
    torch.save({"s": s.detach(), "losses": res.losses, "steps": res.steps,
                "lin": lin.weight.detach(), "best": (res.best_step, res.best_loss)}, out)
    D.destroy_process_group()
''')


def _gloo_pair(tmp_path: Path, *extra: str) -> tuple[dict[str, Any], dict[str, Any]]:
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"r{r}.pt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), "2",
                               str(tmp_path / "rdv"), str(outs[r]), str(tmp_path / "data.pt"),
                               *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    for p in procs:
        log, _ = p.communicate(timeout=120)
        assert p.returncode == 0, log[-3000:]
    return torch.load(outs[0]), torch.load(outs[1])


def test_two_gloo_ranks_average_gradients(tmp_path: Path) -> None:
    torch.manual_seed(0)
    w = nn.Linear(8, 8, bias=False).weight.detach()
    g = torch.Generator().manual_seed(5)
    hidden = [torch.randn(2, 6, 8, generator=g) for _ in range(3)]
    target = [torch.nn.functional.linear(h, w * S_TRUE.view(1, -1)) for h in hidden]
    torch.save({"hidden": hidden, "target": target}, tmp_path / "data.pt")
    r0, r1 = _gloo_pair(tmp_path)
    assert torch.equal(r0["s"], r1["s"]) and r0["losses"] == r1["losses"]
    assert r0["steps"] == r1["steps"] == 3 * 2  # ceil(3 / 2) steps per epoch

    # by hand: step 0 averages rank 0's batch 0 and rank 1's batch 1; step 1 is rank 0's
    # batch 2 alone (rank 1 has none left); Adam on the averaged gradients
    s = nn.Parameter(torch.ones(8))
    opt = torch.optim.AdamW([{"params": [s], "lr": 0.05}], weight_decay=0.0)
    for _ in range(3):
        for group in ([0, 1], [2]):
            grads = []
            for i in group:
                s.grad = None
                out = torch.nn.functional.linear(hidden[i], w * s.view(1, -1))
                torch.nn.functional.mse_loss(out, target[i]).backward()
                grads.append(s.grad.clone())
            s.grad = sum(grads) / len(grads)
            opt.step()
    assert torch.allclose(r0["s"], s.detach(), atol=1e-6), (r0["s"], s)
    # the mean of one rank's gradients would land elsewhere
    assert not torch.allclose(r0["s"], torch.ones(8))


def test_two_gloo_ranks_agree_on_the_best_step(tmp_path: Path) -> None:
    """keep_best under torchrun: the step losses are means over both ranks, so both ranks
    keep the same step and end with the same tensors (signed descent, linear schedule)."""
    torch.manual_seed(0)
    w = nn.Linear(8, 8, bias=False).weight.detach()
    g = torch.Generator().manual_seed(5)
    hidden = [torch.randn(2, 6, 8, generator=g) for _ in range(3)]
    target = [torch.nn.functional.linear(h, w * S_TRUE.view(1, -1)) for h in hidden]
    torch.save({"hidden": hidden, "target": target}, tmp_path / "data.pt")
    r0, r1 = _gloo_pair(tmp_path, "signed")
    assert r0["best"] == r1["best"] and r0["best"][0] is not None
    assert torch.equal(r0["s"], r1["s"]) and not torch.equal(r0["s"], torch.ones(8))


def test_refuse_data_parallel_is_a_no_op_in_one_process() -> None:
    recon.refuse_data_parallel("x", "y")  # no ranks: nothing raised


def test_cycle_sampler_sees_every_sample_equally_often() -> None:
    """sampler="cycle" walks a shuffled order (AutoRound's index sampler): over 6 steps of 2
    from 4 samples each sample appears 3 times; "random" draws afresh (counts differ)."""
    seen: dict[str, list[int]] = {}
    block = toy_block()
    inputs = BlockInputs([torch.randn(1, 4, 8) for _ in range(4)], [{} for _ in range(4)])
    targets = recon.Targets(list(inputs.hidden))
    for sampler in ("cycle", "random"):
        s = nn.Parameter(torch.ones(8))
        got: list[int] = []

        def loss(out: torch.Tensor, batch: recon.Batch, got: list[int] = got) -> torch.Tensor:
            got.extend(int(i) for i in batch.index)
            return recon.mse(out, batch.target)

        recon.reconstruct(block, inputs, targets, [recon.ParamGroup([s], lr=0.01)],
                          settings=recon.ReconSettings(iterations=6, batch_size=2,
                                                       sampler=sampler, seed=1),
                          params=scale_params(s), loss=loss)
        seen[sampler] = [got.count(i) for i in range(4)]
    assert seen["cycle"] == [3, 3, 3, 3]
    assert sum(seen["random"]) == 12
    with pytest.raises(ValueError, match="sampler 'x'; allowed: random, cycle"):
        recon.ReconSettings(sampler="x")


def test_sampled_batches_gather_rows_in_place_without_a_concatenated_copy() -> None:
    """The sampled iterations' pool picks rows from the calibration batches as they are
    (batches of 3, 1 and 2 samples): each batch equals the rows of the concatenation at the
    drawn indices, aug and float inputs included, and the pool holds the caller's tensors,
    not copies (a copy doubled the GPU memory of inputs and targets)."""
    from llmcq.recon.train import _Pool

    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(n, 4, 8, generator=gen) for n in (3, 1, 2)]
    target = [torch.randn(n, 4, 8, generator=gen) for n in (3, 1, 2)]
    aug = [torch.randn(n, 4, 8, generator=gen) for n in (3, 1, 2)]
    inputs = BlockInputs(hidden, [{} for _ in hidden])
    pool = _Pool(inputs, recon.Targets(target, aug, list(hidden)), [{} for _ in hidden])
    assert len(pool) == 6
    assert all(a is b for a, b in zip(pool.hidden, hidden, strict=True))
    assert all(a is b for a, b in zip(pool.target, target, strict=True))
    for idx in (torch.tensor([5, 0, 3]), torch.tensor([1, 2, 4, 4]), torch.arange(6)):
        b = pool.batch(idx)
        assert torch.equal(b.hidden, torch.cat(hidden)[idx])
        assert torch.equal(b.target, torch.cat(target)[idx])
        assert torch.equal(b.aug, torch.cat(aug)[idx])
        assert torch.equal(b.float_hidden, torch.cat(hidden)[idx])
        assert b.index is idx
    with pytest.raises(ValueError, match="one sequence length"):
        _Pool(BlockInputs([torch.zeros(1, 4, 8), torch.zeros(1, 5, 8)], [{}, {}]),
              recon.Targets([torch.zeros(1, 4, 8), torch.zeros(1, 5, 8)]), [{}, {}])
