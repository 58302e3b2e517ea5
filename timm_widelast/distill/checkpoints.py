"""Training checkpoints: atomic ``save_state`` folders, listing them, and finding the one to resume.

A checkpoint folder is complete when its ``meta.json`` exists; half-written ones are ignored.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import UserError

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"


def list_checkpoints(ckpt_root: Path) -> List[Path]:
    """Complete checkpoints, oldest first. Half-written ones (``.tmp-*``, no meta.json) are ignored."""
    if not ckpt_root.is_dir():
        return []
    done = [d for d in ckpt_root.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / META_FILE).is_file()]
    return sorted(done, key=lambda d: d.name)


def save_checkpoint(accelerator, ckpt_root: Path, meta: Dict[str, Any], keep: int) -> Path:
    """Atomic ``save_state``: write into a temp folder, then rename; prune to the last ``keep``.

    A kill at any moment leaves either the previous checkpoints or the new complete one: the
    rename is the commit, and ``meta.json`` (written last, fsynced) marks a folder as complete.
    """
    name = f"ckpt_{meta['num_updates']:09d}_e{meta['epoch']:04d}_b{meta['batch']:07d}"
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_resume_checkpoint(resume: str, run_dir: Path) -> Optional[Path]:
    """``auto`` -> latest in this run (None when there is none); a path -> that checkpoint or run's latest."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir / CHECKPOINT_DIR)
        return found[-1] if found else None
    path = Path(resume)
    if (path / META_FILE).is_file():
        return path
    for root in (path / CHECKPOINT_DIR, path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise UserError(f"--resume {resume}: no complete checkpoint there")

