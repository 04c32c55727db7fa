"""The same MLP, data and SGD with PyTorch DistributedDataParallel (gloo), one thread per process.

Launched by the same mpiexec as the others (rank and size from PMI_RANK/PMI_SIZE; no MPI
inside torch); rendezvous over TCP on 127.0.0.1:--port.

    mpiexec -n 2 python benchmarks/ddp_loop.py --batch 64 --steps 30 --port 29512
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.argv, _port = [a for a in sys.argv if not a.startswith("--port=")], \
    next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--port=")), 29512)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import common  # noqa: E402


def main() -> int:
    args = common.args_from_argv()
    torch.set_num_threads(1)
    rank, size = common.rank_and_size()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_port}", rank=rank,
                            world_size=size)
    x_all, y_all = common.synthetic()
    x_all = torch.from_numpy(x_all.astype(np.float32))
    y_all = torch.from_numpy(y_all)
    ws, bs = common.he_init()
    layers = []
    for i, (w, b) in enumerate(zip(ws, bs)):
        lin = torch.nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if i < len(ws) - 1:
            layers.append(torch.nn.ReLU())
    model = DDP(torch.nn.Sequential(*layers))
    opt = torch.optim.SGD(model.parameters(), lr=common.LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    b, gb = args.batch, args.batch * size
    per_epoch = len(x_all) // gb
    gen = torch.Generator().manual_seed(common.SEED)
    order = None
    stamps = [common.now()]
    for step in range(args.warmup + args.steps + 1):
        k = step % per_epoch
        if k == 0:
            order = torch.randperm(len(x_all), generator=gen)
        idx = order[k * gb + rank * b: k * gb + (rank + 1) * b]
        x, y = x_all[idx], y_all[idx]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()          # DDP averages the gradients (bucketed allreduce, overlapped)
        opt.step()
        stamps.append(common.now())
    common.report("ddp", rank, size, b, stamps, args.warmup + 1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
