"""Several processes: each evaluates its shard of every task; rank 0 gathers and writes the results.

Launch (one process per GPU, or several CPU processes with gloo; no accelerate config file needed)::

    accelerate launch --multi_gpu --num_processes 4 run_bench.py --device cuda ...
    accelerate launch --multi_gpu --num_processes 2 run_bench.py --device cpu ...   # CPU processes, gloo
    torchrun --nproc_per_node 2 run_bench.py ...                                     # the same without accelerate

`accelerate launch --cpu --num_processes N` starts a single process unless accelerate is given an MPI hostfile
(accelerate 1.15, `commands/launch.py` `launch_command`: `--cpu` always takes the `simple_launcher`), so CPU runs
use `--multi_gpu` (torchrun underneath) and `--device cpu`, which selects gloo.

What lmms-eval 0.7.3 does, and what is left to us (the runner and `benchmarks.lmms_model`):

* `evaluator.evaluate` reads RANK / WORLD_SIZE from the environment, gives each rank every WORLD_SIZE-th doc
  (`Task.build_all_requests(rank=, world_size=)`), pads the shorter ranks with copies of their last request, and
  gathers the logged samples and per-sample metrics to rank 0 (`torch.distributed.gather_object`); only rank 0's
  `simple_evaluate` returns results, the others return None.
* It calls `lm.accelerator.gather(torch.tensor(n, device=lm.device))`: the model needs an `accelerator` and a
  `device` (lmms-eval's base class has no `device`).
* It knows nothing of our per-sample token traces, batch times, pictures or peak memory (the model's
  `benchmarks.records.Recorder`): those stay on the process that ran the sample until `Recorder.take` brings them
  to rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object


def launched_world_size() -> int:
    """Processes started by the launcher (torchrun / accelerate set WORLD_SIZE); 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0, and in a run without a launcher."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run.

    Attributes:
        rank: global index of this process (0 writes the results).
        size: number of processes.
        local_rank: index of this process on its machine (selects its GPU).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_for(self, device: str) -> str:
        """This process's device: a bare "cuda" becomes "cuda:LOCAL_RANK" when there are several processes."""
        if self.size > 1 and str(device) == "cuda":
            return f"cuda:{self.local_rank}"
        return str(device)

    def barrier(self) -> None:
        """Wait for every process (no-op in a single process): accelerate's `wait_for_everyone`."""
        if self.size > 1:
            PartialState().wait_for_everyone()

    def broadcast(self, obj):
        """Rank 0's `obj` on every process (picklable objects): accelerate's `broadcast_object_list`."""
        if self.size == 1:
            return obj
        return broadcast_object_list([obj if self.is_main else None], from_process=0)[0]

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process (picklable objects): accelerate's
        `gather_object` of a one-item list each."""
        if self.size == 1:
            return [obj]
        return gather_object([obj])


def current_world(device: str = "cpu") -> World:
    """The processes of this run. Under a launcher (WORLD_SIZE > 1) the first call initialises torch.distributed
    through accelerate's `PartialState`: gloo when `device` is the CPU, NCCL on CUDA. Later calls reuse it."""
    if launched_world_size() <= 1:
        return World()
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but LOCAL_RANK is unset: start the processes with `accelerate launch "
                           "--multi_gpu --num_processes N run_bench.py ...` or `torchrun --nproc_per_node N ...`")
    state = PartialState(cpu=not str(device).startswith("cuda"))
    if state.num_processes != launched_world_size():
        raise RuntimeError(f"accelerate sees {state.num_processes} processes but WORLD_SIZE is "
                           f"{launched_world_size()}; pass --device cuda for GPUs or --device cpu for CPU processes")
    return World(rank=state.process_index, size=state.num_processes, local_rank=state.local_process_index)
