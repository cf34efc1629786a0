"""Data-parallel DDPNOpt and EKFAC on torch.distributed (gloo, 2 processes): R ranks with b
samples each equal one process with R b samples, ranks bit-identical after every step, collective
counts, refusals agreed by all ranks; a checkpoint of one process resumed on two; the launcher and
the process map; bad input. float64 wherever exactness is asserted."""
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import checkpoint_run
import distributed_cases as cases
from nn_adapter import DDPNOpt, EKFAC
from nn_adapter.distributed import Collectives, launch, parallel_map, shard

RESUME_AT, EPOCHS = 2, 4


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One launch of 2 gloo processes running every case (and a resumption of a 1-process
    checkpoint), and the same cases on this process with the whole batch."""
    folder = tmp_path_factory.mktemp("resume")
    with torch.random.fork_rng():
        checkpoint_run.train(folder, RESUME_AT, dropout=False)
        uninterrupted = checkpoint_run.train(tmp_path_factory.mktemp("whole"), EPOCHS,
                                             dropout=False)
        single = {name: cases.run_case(name) for name in cases.CASES}
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)]
    ranks = launch(cases.worker, 2, list(cases.CASES), str(folder), EPOCHS)
    assert handlers == [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT,
                                                      signal.SIGHUP)]   # the caller's, kept
    return ranks, single, uninterrupted


@pytest.mark.parametrize("name", list(cases.CASES))
def test_two_ranks_equal_one_process_with_the_whole_batch(two_ranks, name):
    ranks, single, _ = two_ranks
    start = cases.flat(cases.make_model())
    assert np.abs(single[name]["params"][-1] - start).max() > 1e-2      # the run moved
    for step, (a, b, s) in enumerate(zip(ranks[0][name]["params"], ranks[1][name]["params"],
                                         single[name]["params"])):
        assert np.array_equal(a, b), f"step {step}: the ranks' parameters differ"
        assert np.abs(a - s).max() < 1e-10, f"step {step}"
    assert np.allclose(ranks[0][name]["clamped"], single[name]["clamped"], rtol=0, atol=1e-12)


def test_collectives_per_step(two_ranks):
    """1 agreement + one per stage with feedback (T - 1 = 2) + EKFAC's statistics (1; 2 on the
    eigenbasis refreshes of steps 1, 3, 5) + 1 for the diagnostics. With factor_update_freq=2 and
    eigen_update_freq=3: s alone on step 2 (no factors), A and G with s on steps 3 and 5, s alone
    in the new bases on step 4 (a refresh without factors)."""
    calls = {name: two_ranks[0][0][name]["calls"] for name in cases.CASES}
    assert calls["ddpnopt-adam"] == [3] * 5
    assert calls["ddpnopt-adam-group"] == [3] * 5          # the gradients ride in the agreement
    assert calls["ddpnopt-ekfac"] == [5, 4, 5, 4, 5]
    assert calls["ddpnopt-rmsprop-gn-dense"] == [4] * 5
    assert calls["ddpnopt-adam-nofeedback"] == [1] * 5
    assert calls["ekfac"] == [3, 2, 3, 2, 3]
    assert calls["ekfac-group-noclosure"] == [3, 2, 3, 2, 3]
    assert calls["ekfac-sparse-factors"] == [3, 2, 2, 2, 2]


def test_a_step_refused_on_one_rank_is_refused_on_all(two_ranks):
    """Rank 1 alone has a NaN input: both refuse the step (unchanged, warned); then rank 1 alone
    calls the model twice: both raise, rank 1 with its own error, rank 0 naming the ranks."""
    r0, r1 = (r["refusals"] for r in two_ranks[0])
    assert r0["unchanged"] and r1["unchanged"] and r0["warned"] and r1["warned"]
    assert "was called 2 times" in r1["error"]
    assert "refused on 1 of 2 ranks" in r0["error"]
    assert np.array_equal(r0["params"], r1["params"])
    assert "batch_size: 63 is not divisible by the world size 2" in r0["shard_error"]
    # the same with EKFAC, whose agreement carries no numbers of its own on either rank
    assert "ran 2 times" in r1["ekfac_error"] and "refused on 1 of 2 ranks" in r0["ekfac_error"]
    assert r0["ekfac_unchanged"] and r1["ekfac_unchanged"]


def test_a_one_process_checkpoint_resumes_on_two_ranks(two_ranks):
    ranks, _, uninterrupted = two_ranks
    assert np.array_equal(ranks[0]["resumed"], ranks[1]["resumed"])
    assert np.abs(ranks[0]["resumed"] - uninterrupted).max() < 1e-10


def test_parallel_map_gives_the_serial_results():
    serial = [cases.seeded_run(s) for s in (0, 1, 2)]
    parallel = parallel_map(cases.seeded_run, [0, 1, 2], workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel))
    assert not np.array_equal(serial[0], serial[1])


# -- one process in a process group of one ---------------------------------------------------------
@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _run(opt, model, net):
    out = []
    for x, y in cases.batches():
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        out.append(cases.flat(net))
    return out


@pytest.mark.parametrize("curvature", ["adam", "ekfac"])
def test_a_world_of_one_is_the_plain_optimizer_bit_for_bit(group_of_one, curvature):
    options = dict(lr=0.05, curvature=curvature)
    plain_net = cases.make_model()
    plain = _run(DDPNOpt(plain_net, **options), plain_net, plain_net)
    net = cases.make_model()
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = DDPNOpt(ddp, **options)
    assert isinstance(opt.collectives, Collectives) and not opt.collectives.average_gradients
    assert all(np.array_equal(a, b) for a, b in zip(plain, _run(opt, ddp, net)))
    assert opt.collectives.seconds > 0


def test_a_ddp_model_with_another_process_group_is_refused(group_of_one):
    ddp = nn.parallel.DistributedDataParallel(cases.make_model())
    other = dist.new_group([0])
    with pytest.raises(ValueError, match="process_group"):
        EKFAC(ddp, process_group=other)


# -- bad input -------------------------------------------------------------------------------------
def test_process_group_without_torch_distributed_is_an_error_naming_it():
    net = cases.make_model()
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        DDPNOpt(net, process_group=object())
    with pytest.raises(ValueError, match="process_group"):
        EKFAC(net, process_group=object())


@pytest.mark.parametrize("nproc", [0, -1, 1.5, True, "2"])
def test_launch_refuses_a_bad_process_count(nproc):
    with pytest.raises(ValueError, match="nproc"):
        launch(cases.seeded_run, nproc)


@pytest.mark.parametrize("name", ["workers", "threads"])
def test_parallel_map_refuses_bad_counts(name):
    with pytest.raises(ValueError, match=name):
        parallel_map(abs, [1], **{name: 0})


def test_shard_refuses_batches_of_different_sizes_and_keeps_a_single_process_batch():
    x = torch.arange(6)
    assert shard(x) is not None and torch.equal(shard(x), x)
    with pytest.raises(ValueError, match="different batch sizes"):
        shard(x, torch.arange(5))

