"""``python -m common.transforms.itk_worker JOB RESULT``: run one function saved by
:func:`common.transforms.in_fresh_process` in this new process and save what it returns.

Not imported by the package: run as a module, it would otherwise be imported twice (runpy's warning).
"""

from __future__ import annotations

import importlib
import sys

import torch


def main(job_path: str, result_path: str) -> None:
    from common.transforms import itk_bridge

    itk_bridge._IN_FRESH_PROCESS = True  # nested calls run here, in this process
    # the parent's own file, written a moment ago: full unpickling is safe here
    job = torch.load(job_path, weights_only=False)
    fn = importlib.import_module(job["module"])
    for part in job["name"].split("."):
        fn = getattr(fn, part)
    torch.save(fn(*job["args"], **job["kwargs"]), result_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
