"""Several processes (DDP on gloo, as under torchrun on CPU): ranks stay in sync, resume works."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed import init_distributed
from model import create_model, read_checkpoint
from train_eval import TIMING_COLUMNS, fit, make_config, make_loaders


class Interrupt(Exception):
    pass


def _stop_after_first_epoch(epoch, row):
    if epoch == 0:
        raise Interrupt


def _worker(rank, world, port, data_dir, out, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        KD_PROGRESS="0",
    )
    torch.set_num_threads(1)
    init_distributed()  # the caller joins the process group; nothing in the library does it behind its back
    cfg = make_config("smoke", data_dir=data_dir, out_dir=out, epochs=3)

    def run(run_dir, callbacks=()):
        train_loader, _, test_loader = make_loaders(cfg)
        torch.manual_seed(0)
        model = create_model("vgg8", num_classes=10, width=cfg.width)
        return model, fit(model, train_loader, test_loader, cfg, run_dir, callbacks), len(train_loader)

    model, history, steps = run(os.path.join(out, "straight"))
    try:
        run(os.path.join(out, "resumed"), callbacks=(_stop_after_first_epoch,))
    except Interrupt:
        pass
    dist.barrier()
    resumed, resumed_history, _ = run(os.path.join(out, "resumed"))
    torch.save(
        {
            "state": model.state_dict(),
            "resumed": resumed.state_dict(),
            "history": history,
            "resumed_history": resumed_history,
            "steps": steps,
        },
        results[rank],
    )
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_stay_in_sync_learn_and_resume(synthetic_dir, tmp_path):
    results = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    mp.spawn(_worker, args=(2, _free_port(), synthetic_dir, str(tmp_path / "runs"), results), nprocs=2)
    r0, r1 = (torch.load(p, weights_only=False) for p in results)
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), f"{key} differs between ranks"
        assert torch.equal(value, r0["resumed"][key]), f"{key} differs after resuming"
    assert r0["steps"] == 1000 // 2 // 64  # each rank sees its half of the 1000-image epoch
    h = r0["history"]
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0] and h["test_top1"].iloc[-1] > 30
    assert h.drop(columns=TIMING_COLUMNS).equals(r1["history"].drop(columns=TIMING_COLUMNS))
    assert h.drop(columns=TIMING_COLUMNS).equals(r0["resumed_history"].drop(columns=TIMING_COLUMNS))
    ckpt = read_checkpoint(str(tmp_path / "runs" / "straight"))
    assert ckpt["epoch"] == 3 and len(ckpt["metrics"]) == 3
