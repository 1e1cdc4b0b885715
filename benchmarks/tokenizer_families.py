"""Tiny LLaVA-1.5 on easy-VQA with an LLM of each tokenizer family: records refused, accuracy, answers that stop.

    python benchmarks/tokenizer_families.py                       # gpt2, llama, qwen2 (+ the project's own), ~15 min
    python benchmarks/tokenizer_families.py --families llama --eval-limit 1000

For each family a tokenizer is trained offline with the family's own transformers class on the project's
easy-VQA text corpus (`vlmkit.tiny.build.text_corpus`, training split only) and a random LlamaForCausalLM of
the tiny LM's shape (4 layers x 128) carries it; `tiny` is the project's own byte-level BPE with a random LM of
the same shape. Each trains through both of llava-1.5's stages with the tiny vision tower (`plain` captions,
then multi-turn `vicuna_v1` instructions, or the `--template` given), exactly as `vlmkit train` does, and is
evaluated greedily on easy-VQA's test questions. Reported per family: records refused (must be 0), seconds,
accuracy, and answers that did not stop within the eval's token budget or show stop text. Prints a table,
writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the family tokenizer builders the tests use


def build_llm(family: str, directory: Path, seed: int) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vlmkit.tiny import resolve
    from vlmkit.tiny.build import LM_CONFIG, TOKENIZER_VOCAB, text_corpus

    if family == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(resolve("tiny:tokenizer"))
    else:
        from families import build_tokenizer
        tokenizer = build_tokenizer(family, vocab_size=TOKENIZER_VOCAB, texts=text_corpus())
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **LM_CONFIG)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def run_family(family: str, template: str, work: Path, seed: int, eval_limit: int) -> dict:
    from vlmkit.archs import from_name
    from vlmkit.data.sources import DataSpec
    from vlmkit.eval.vqa import run_eval
    from vlmkit.infer.generate import model_stop
    from vlmkit.train.run import train_run

    llm = build_llm(family, work / f"llm-{family}", seed)
    overrides = {"llm": {"name_or_path": llm}, "seed": seed}
    if template:
        overrides["template"] = template
    config = from_name("llava-1.5", scale="tiny", **overrides)
    start = time.time()
    result = train_run(config, work / f"run-{family}", DataSpec(), verbose=False, log=lambda *a, **k: None)
    train_seconds = time.time() - start
    model = result["model"]
    report = run_eval(model, "easy-vqa", "test", None, False, work / f"run-{family}", limit=eval_limit,
                      verbose=False)
    stop = model_stop(model)
    shown = sum(1 for p in report["predictions"] if stop.text and stop.text in p["prediction"])
    long = sum(1 for p in report["predictions"] if len(model.tokenizer.encode(p["prediction"],
                                                                                add_special_tokens=False)) >= 8)
    return {"family": family, "tokenizer": type(model.tokenizer).__name__, "template": config.template,
            "vocab": len(model.tokenizer), "stop": {"text": stop.text, "ids": sorted(stop.ids),
                                                    "strings": list(stop.strings)},
            "refused": result["skipped"], "train_seconds": round(train_seconds, 1),
            "stage_losses": {s["stage"]: [round(s["first_loss"], 4), round(s["final_loss"], 4)]
                             for s in result["stages"]},
            "accuracy": report["accuracy"], "questions": report["total"],
            "per_answer": {a: round(v["accuracy"], 4) for a, v in report["per_answer"].items()}, "eval_seconds": round(report["seconds"], 1),
            "answers_showing_stop_text": shown, "answers_at_token_budget": long}


def machine() -> dict:
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if "Model name" in line), "?")
    return {"cpu": model, "avx2": " avx2 " in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx": "amx_bf16" in flags, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="tiny,gpt2,llama,qwen2")
    parser.add_argument("--template", default="", help="template for every family ('' = the preset's vicuna_v1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-limit", type=int, default=0, help="first N test questions (0 = all 9,673)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tokenizer_families.json"))
    parser.add_argument("--keep", default="", help="keep the runs (models, eval reports) in this directory")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for family in args.families.split(","):
            rows.append(run_family(family, args.template, work, args.seed, args.eval_limit))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| family | tokenizer | template | refused | accuracy | stop text shown | at budget | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['tokenizer']} | {r['template']} | {sum(sum(c.values()) for c in r['refused'].values())} "
              f"| {r['accuracy']:.2%} of {r['questions']} | {r['answers_showing_stop_text']} | "
              f"{r['answers_at_token_budget']} | {r['train_seconds']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine(), "results": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
