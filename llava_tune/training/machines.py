"""Several machines (nodes) in one launch: which folders every process sees, and how work that
fills a folder is shared out.

The processes of one machine share its disks. Processes on several machines share a folder
only when it lies on a filesystem every machine mounts (NFS, Lustre, GPFS, ...), which
nothing but a look can tell. Work whose results land in a folder (the feature cache) is split
over every process of the launch when all of them see that folder, and over each machine's
own processes when they do not, so that every machine's copy ends up whole: a machine's
processes train on any sample, not only on those whose results they computed.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from llava_tune.launch import machines, processes_per_machine

T = TypeVar("T")


def seen_by_all(folder: Path, accelerator: Accelerator) -> bool:
    """Whether every process of the launch sees the same `folder` (the main process creates it
    when missing). One machine always does; several machines are asked: the main process puts
    a file of a new name in the folder and every process looks for it."""
    if machines(accelerator.num_processes) == 1:
        return True
    name: list[str | None] = [f".seen-by-all-{uuid.uuid4().hex}" if accelerator.is_main_process
                              else None]
    marker = None
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / name[0]
        marker.touch()
    broadcast_object_list(name)  # sent after the file exists: every look comes after it
    seen = (folder / name[0]).is_file()
    unseen = accelerator.reduce(torch.tensor([float(not seen)], device=accelerator.device),
                                reduction="sum")
    if marker is not None:  # every process has looked: the reduction waited for all of them
        marker.unlink(missing_ok=True)
    return unseen.item() == 0


def share(items: list[T], accelerator: Accelerator, shared: bool) -> list[T]:
    """This process's part of `items` (the same list, in the same order, in every process):
    of the whole launch's work when the folder it fills is `shared` by all, else of its
    machine's (each machine then does all of it)."""
    if shared:
        return items[accelerator.process_index::accelerator.num_processes]
    return items[accelerator.local_process_index::processes_per_machine(accelerator.num_processes)]


def machine_index(accelerator: Accelerator) -> int:
    """Which machine this process is on, 0 for the main one: torchrun numbers a machine's
    processes one after the other (rank = machine x processes per machine + local rank)."""
    return accelerator.process_index // processes_per_machine(accelerator.num_processes)


def per_disk(value: float, accelerator: Accelerator, shared: bool) -> list[float]:
    """`value` summed over the processes that write to one disk: all of them when `shared`
    (one entry), else each machine's (an entry per machine, in machine order). Every process
    gets the whole list."""
    count = machines(accelerator.num_processes)
    row = torch.zeros(count, dtype=torch.float64, device=accelerator.device)
    row[0 if shared else machine_index(accelerator)] = value
    sums = accelerator.reduce(row, reduction="sum")
    return sums[:1].tolist() if shared else sums.tolist()
