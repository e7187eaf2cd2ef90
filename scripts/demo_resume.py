"""Kill a real capture mid-run, resume it, and compare with an uninterrupted capture.

    python scripts/demo_resume.py --input runs/results/inputs.jsonl --out runs/resume_demo

1. ``uninterrupted/``: the capture run start to finish (its wall time is the reference);
2. ``resumed/``: the same command, killed with SIGKILL after ``--kill-after`` seconds, then rerun;
3. the two manifests' content hashes (sha256 over every file of every shard) must be equal, and no
   sequence may appear twice. Prints a markdown summary and writes ``demo_resume.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def capture_cmd(args, out: Path) -> list[str]:
    exe = Path(sys.executable).with_name("surprise-probe")
    return [str(exe), "capture", "--model", args.model, "--input", str(args.input), "--out", str(out),
            "--shard-size", str(args.shard_size)]


def run(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/resume_demo"))
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--kill-after", type=float, default=45.0, help="seconds before SIGKILL")
    args = parser.parse_args()
    import shutil

    import numpy as np

    from surprise_probe.core.capture.store import completed_shards, load_capture

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    full_seconds = run(capture_cmd(args, args.out / "uninterrupted"))

    process = subprocess.Popen(capture_cmd(args, args.out / "resumed"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(args.kill_after)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    shards_at_kill = len(completed_shards(args.out / "resumed"))
    leftovers = sorted(p.name for p in (args.out / "resumed" / "shards").iterdir() if p.name.startswith(".tmp-"))
    had_manifest = (args.out / "resumed" / "manifest.json").exists()
    resume_seconds = run(capture_cmd(args, args.out / "resumed"))

    full, resumed = load_capture(args.out / "uninterrupted"), load_capture(args.out / "resumed", verify=True)
    seq = resumed.column("sequence_ids")
    starts = np.flatnonzero(np.r_[True, np.diff(seq) != 0])
    summary = {
        "model": args.model,
        "n_sequences": full.n_sequences,
        "n_tokens": full.n_tokens,
        "n_shards": full.n_shards,
        "uninterrupted_seconds": round(full_seconds, 1),
        "killed_after_seconds": args.kill_after,
        "shards_complete_at_kill": shards_at_kill,
        "partial_shard_folders_at_kill": leftovers,
        "manifest_present_at_kill": had_manifest,
        "resume_seconds": round(resume_seconds, 1),
        "same_content_hash": full.manifest["content_hash"] == resumed.manifest["content_hash"],
        "duplicated_sequences": int(len(starts) - len(np.unique(seq))),
    }
    (args.out / "demo_resume.json").write_text(json.dumps(summary, indent=2))
    for key, value in summary.items():
        print(f"| {key} | {value} |")
    return 0 if summary["same_content_hash"] and summary["duplicated_sequences"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
