"""Sampled tokens per second: the toolkit's sampler against Hugging Face ``generate``, in one run.

Same weights (the embedded model's float32 Hugging Face folder, loaded into TransformerLens for
ours and as a plain ``AutoModelForCausalLM`` for Hugging Face), same prompts (left-padded chat
prompts), same settings: pure temperature sampling (``top_k=0``, ``top_p=1``), exactly
``--max-new-tokens`` new tokens per row (no early stop on either side), KV cache on both. The two
run alternately, best of ``--repeats``, so machine load affects both alike. Ours runs twice per
repeat: as it samples (fused attention where that is the same computation) and with
TransformerLens' own attention (``sampling.FUSE_ATTENTION = False`` on a HookedTransformer,
``fuse_bridge_attention(model, enable=False)`` on a TransformerBridge), which checks the ids agree.
Run it under each TransformerLens (3.9 and 4.x venvs) for both versions' figures. On a
HookedTransformer a second copy of the model, in TransformerLens' usual weight layout (as
``load_model`` gave it before 2026-12-08: each sample call re-lays the weights out and back), is
timed in the same alternation.
Prints and writes ``bench_generate.json`` with the ratio ours / Hugging Face (target >= 1.0, issue #29).

    flock /tmp/sp-model.lock .venv/bin/python scripts/bench_generate.py --out /tmp/bench-generate
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from surprise_probe.core.forward import sampling
from surprise_probe.core.forward.sampling import chat_prompt_ids, sample
from surprise_probe.core.models.attention import fuse_bridge_attention
from surprise_probe.core.models.backends import is_bridge, transformer_lens_version
from surprise_probe.core.models.loading import EMBEDDED_MODELS, embedded_folder, load_model
from surprise_probe.core.text.files import builtin_prompts
from surprise_probe.core.utils.jsonio import software_versions, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", choices=sorted(EMBEDDED_MODELS))
    parser.add_argument("--backend", default="auto", choices=["auto", "hooked", "bridge"],
                        help="TransformerLens backend of our side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM

    ours = load_model(args.model, device="cpu", backend=args.backend)
    usual = None
    if not is_bridge(ours):
        # The HookedTransformer as loaded before 2026-12-08: TransformerLens' weight layout, which
        # each sample call re-lays out and back (decoding_layout); timed in the same alternation.
        from surprise_probe.core.models import loading

        loading.FORWARD_LAYOUT_AT_LOAD = False
        usual = load_model(args.model, device="cpu", backend=args.backend)
        loading.FORWARD_LAYOUT_AT_LOAD = True
    hf = AutoModelForCausalLM.from_pretrained(embedded_folder(args.model), dtype=torch.float32).eval()
    prompts = [chat_prompt_ids(ours, p["prompt"]) for p in builtin_prompts()[: args.batch_size]]
    width = max(len(p) for p in prompts)
    pad = ours.tokenizer.pad_token_id if ours.tokenizer.pad_token_id is not None else ours.tokenizer.eos_token_id
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    n_tokens = len(prompts) * args.max_new_tokens

    samples = {}

    def run_ours(fused: bool = True, model=ours) -> float:
        sampling.FUSE_ATTENTION = fused
        if is_bridge(ours):
            fuse_bridge_attention(ours, enable=fused)
        started = time.perf_counter()
        out = sample(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     stop_ids=(), batch_size=len(prompts))
        elapsed = time.perf_counter() - started
        sampling.FUSE_ATTENTION = True
        fuse_bridge_attention(ours)
        assert sum(len(s.response_ids) for s in out) == n_tokens
        samples[fused if model is ours else "usual"] = [s.response_ids for s in out]
        return elapsed

    def run_hf() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                              temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                              min_new_tokens=args.max_new_tokens, pad_token_id=pad, use_cache=True)
        elapsed = time.perf_counter() - started
        assert out.shape[1] - width == args.max_new_tokens
        return elapsed

    run_ours(), run_ours(False), run_hf()  # warm-up (allocator, kernels)
    times = {"ours": [], "ours_own_attention": [], "hf": []}
    if usual is not None:
        run_ours(model=usual)
        times["ours_usual_layout"] = []
    for _ in tqdm(range(args.repeats), desc="repeats"):
        times["ours"].append(run_ours())
        times["ours_own_attention"].append(run_ours(False))
        if usual is not None:
            times["ours_usual_layout"].append(run_ours(model=usual))
        times["hf"].append(run_hf())
    # Same seeds: the ids agree unless a draw falls within float rounding of a token boundary.
    differing = sum(a != b for a, b in zip(samples[True], samples[False], strict=True))
    best = {k: min(v) for k, v in times.items()}
    rate = {k: n_tokens / v for k, v in best.items()}
    result = {
        "model": args.model, "backend": type(ours).__name__, "transformer_lens": transformer_lens_version(),
        "batch_size": len(prompts),
        "prompt_tokens_max": width, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "threads": args.threads, "repeats": args.repeats, "seconds": times,
        "tokens_per_second": rate, "ratio_ours_over_hf": rate["ours"] / rate["hf"],
        "ratio_own_attention_over_hf": rate["ours_own_attention"] / rate["hf"],
        "rows_differing_fused_vs_own_attention": differing,
        "ratio_usual_layout_over_hf": rate["ours_usual_layout"] / rate["hf"] if usual is not None else None,
        "same_ids_usual_layout": samples.get("usual") == samples[True] if usual is not None else None,
        "software_versions": software_versions(),
    }
    write_json(args.out / "bench_generate.json", result)
    print(f"{args.model} ({type(ours).__name__}, TransformerLens {transformer_lens_version()}), batch {len(prompts)} x {args.max_new_tokens} new tokens, "
          f"T={args.temperature}, {args.threads} threads, best of {args.repeats}:")
    print(f"  ours {rate['ours']:.1f} tok/s   Hugging Face generate {rate['hf']:.1f} tok/s   "
          f"ratio {result['ratio_ours_over_hf']:.2f} (target >= 1.0, issue #29)")
    print(f"  ours with TransformerLens' own attention {rate['ours_own_attention']:.1f} tok/s   "
          f"ratio {result['ratio_own_attention_over_hf']:.2f}; rows whose ids differ: {differing} of {len(prompts)}")
    if usual is not None:
        print(f"  ours with TransformerLens' weight layout (re-laid out per call, before) {rate['ours_usual_layout']:.1f} "
              f"tok/s   ratio {result['ratio_usual_layout_over_hf']:.2f}; same ids: {result['same_ids_usual_layout']}")


if __name__ == "__main__":
    main()
