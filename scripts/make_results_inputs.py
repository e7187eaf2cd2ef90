"""Write the input files of docs/results.md from the built-in set and the generated responses.

    python scripts/make_results_inputs.py --generated runs/gen/smollm2_t07.jsonl --out runs/results

- ``inputs.jsonl``: the 60 built-in conversations (human-written answers, ``source: human``) and
  every generated response as its sampled token ids (``source: own-sample``);
- ``steer_inputs.jsonl``: 8 human + 8 own-sample items spread over topics, for the steering sweep;
- ``patch_pairs.jsonl``: 12 pairs under the same prompt: source = the model's own sampled answer
  (on-policy), destination = its own answer to a prompt of another topic, read under this prompt
  (off-policy, identical templating);
- with ``--probe``: ``random_dir_{0,1,2}`` (.npz + .json), random unit directions (numpy
  ``default_rng(0)``) carrying the probe's hook and model, the controls for patching.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from surprise_probe.core.text.files import builtin_items
from surprise_probe.core.utils.jsonio import read_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", type=Path, default=Path("runs/gen/smollm2_t07.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("runs/results"))
    parser.add_argument("--probe", type=Path, help="probe direction to build random controls for")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    generated = [record for _, record in read_jsonl(args.generated)]
    human = [{"id": it["id"], "source": "human", "topic": it["topic"], "messages": it["messages"]}
             for it in builtin_items()]
    own = [{"id": r["id"], "source": "own-sample", "topic": r["topic"], "token_ids": r["token_ids"],
            "scored": r["scored"]} for r in generated]
    _write(args.out / "inputs.jsonl", human + own)
    _write(args.out / "steer_inputs.jsonl", human[::6][:8] + own[::12][:8])
    picked = generated[::10][:12]
    pairs = []
    for i, record in enumerate(picked):
        other = picked[(i + 5) % len(picked)]
        if other["topic"] == record["topic"]:
            raise ValueError(f"pair {i}: {other['id']} has the same topic as {record['id']}")
        pairs.append({
            "id": record["id"],
            "source": {"token_ids": record["token_ids"], "scored": record["scored"]},
            "destination": {"messages": [{"role": "user", "content": record["prompt"]},
                                         {"role": "assistant", "content": other["text"]}]},
            "destination_answer_from": other["id"],
        })
    _write(args.out / "patch_pairs.jsonl", pairs)
    print(f"wrote {len(human) + len(own)} inputs, 16 steering inputs, {len(pairs)} pairs to {args.out}")
    if args.probe:
        import numpy as np
        from surprise_probe.probes import ProbeDirection

        probe = ProbeDirection.load(args.probe)
        rng = np.random.default_rng(0)
        for k in range(3):
            vector = rng.normal(size=probe.d_model)
            ProbeDirection(vector / np.linalg.norm(vector), mean=0.0, std=probe.std, hook=probe.hook,
                           layer=probe.layer, model_id=probe.model_id, d_model=probe.d_model,
                           target=f"random control {k} (seed 0)").save(args.out / f"random_dir_{k}")
        print(f"wrote 3 random control directions for {probe.hook}")


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
