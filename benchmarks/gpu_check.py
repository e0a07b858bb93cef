"""One prepared GPU check (issues: generative recommender, AutoMR): throughput at SmolLM2 size and
at a random-init Llama-2-7B shape in bf16.

  python benchmarks/gpu_check.py            # on a CUDA machine (what BENCHMARKS.md quotes)
  python benchmarks/gpu_check.py --tiny     # a seconds-long dry run of the same code on CPU

Measures, per shape: LoRA fine-tuning tokens/s (peft, q_proj+v_proj, r=8), beam-search
inference tokens/s (4 beams, automr's split-model decoder), and annotation time per sample at
|M| = 90 with the upper half of the layers: naive (each candidate through the whole model on its
full prompt) against automr's shared-prefix packed kernel, checking they agree.
Needs only torch, transformers and peft (no data, no download).
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from automr.llm.decoding import beam_search
from automr.llm.loading import LM
from automr.llm.prompts import EncodedPrompt
from automr.llm.split import SplitLM

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(shape: str, device: torch.device, dtype: torch.dtype) -> LM:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(dtype)
        model = LlamaForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=2, bos_token_id=1)
    return LM(model=model, tokenizer=tok, name=f"random-{shape}")


def rand_ids(n: int, vocab: int, g: torch.Generator) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def finetune_tps(lm: LM, batch: int, seq: int, steps: int) -> float:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(lm.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dev = lm.model.device
    ids = torch.randint(3, lm.model.config.vocab_size, (batch, seq), device=dev)
    for i in range(steps + 1):
        if i == 1:
            sync(dev)
            t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(dev)
    tps = steps * batch * seq / (time.perf_counter() - t0)
    model.unload()  # back to the plain model for the next measurements
    lm.model.eval()
    return tps


def inference_tps(split: SplitLM, batch: int, prefix: int, new: int, g: torch.Generator) -> tuple[float, float]:
    V = split.lm.model.config.vocab_size
    prompts = [EncodedPrompt(rand_ids(prefix, V, g), rand_ids(5, V, g), []) for _ in range(batch)]
    beam_search(split, prompts[:1], [None], num_beams=4, max_new_tokens=2)  # warm-up
    sync(split.device)
    t0 = time.perf_counter()
    beam_search(split, prompts, [None] * batch, num_beams=4, max_new_tokens=new)
    sync(split.device)
    dt = time.perf_counter() - t0
    return batch * new / dt, dt / batch


def annotation(split: SplitLM, m: int, prefix: int, slot: int, answer: int, reps: int, g: torch.Generator,
               compiled: SplitLM | None = None) -> dict:
    V, H = split.lm.model.config.vocab_size, split.hidden_size
    prompt = EncodedPrompt(rand_ids(prefix, V, g), rand_ids(5, V, g), rand_ids(answer, V, g))
    cands = [torch.randn(slot, H, generator=g).to(split.device, split.dtype) for _ in range(m)]
    out = {}
    ways = [("shared_prefix", split.score_candidates), ("naive", split.score_candidates_naive)]
    if compiled is not None:  # the same kernel with torch.compile'd layers (warm-up = compilation, not timed)
        ways.insert(1, ("shared_prefix_compiled", compiled.score_candidates))
    for name, fn in ways:
        t0 = time.perf_counter()
        fn(prompt, cands[:2])  # warm-up
        fn(prompt, cands[:m // 2])
        sync(split.device)
        out[name + "_warmup_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        for _ in range(reps):
            res = fn(prompt, cands)
        sync(split.device)
        out[name + "_ms"] = 1000 * (time.perf_counter() - t0) / reps
        out[name] = res
    if compiled is not None:
        res = out.pop("shared_prefix_compiled")
        out["compiled_max_abs_diff_nats"] = (res - out["naive"]).abs().max().item()
        out["compiled_speedup"] = out["naive_ms"] / out["shared_prefix_compiled_ms"]
    diff = (out.pop("shared_prefix") - out.pop("naive")).abs().max().item()
    out["max_abs_diff_nats"] = diff
    out["speedup"] = out["naive_ms"] / out["shared_prefix_ms"]
    from automr.llm import cascade

    out["cascade_fused_kernel"] = cascade._fused_ok.get(split.device.type, True)
    if split.device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def profile_annotation(split: SplitLM, g: torch.Generator) -> None:
    """Where one sample's annotation time goes: candidates per packed pass, then a torch.profiler table."""
    V, H = split.lm.model.config.vocab_size, split.hidden_size
    prompt = EncodedPrompt(rand_ids(230, V, g), rand_ids(5, V, g), rand_ids(10, V, g))
    cands = [torch.randn(10, H, generator=g).to(split.device, split.dtype) for _ in range(90)]
    split.score_candidates(prompt, cands[:4])
    for chunk in [None, 8, 16, 32, 91]:
        sync(split.device)
        t0 = time.perf_counter()
        for _ in range(3):
            split.score_candidates(prompt, cands, chunk_size=chunk)
        sync(split.device)
        print(f"candidates per pass {chunk}: {1000 * (time.perf_counter() - t0) / 3:.1f} ms/sample", flush=True)
    from torch.profiler import ProfilerActivity, profile

    cuda = split.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        split.score_candidates(prompt, cands)
        sync(split.device)
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=18))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="dry run on CPU with a tiny shape")
    ap.add_argument("--shapes", default="smollm2-135m,llama2-7b")
    ap.add_argument("--out", default=None, help="write the results as JSON here too")
    ap.add_argument("--profile-annotation", action="store_true", help="only profile annotation at the last shape")
    ap.add_argument("--annotation-only", action="store_true", help="skip the inference and fine-tuning figures")
    ap.add_argument("--compile", action="store_true", help="also time annotation with torch.compile'd layers")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = {"device": card, "torch": torch.__version__}
    g = torch.Generator().manual_seed(0)
    if args.profile_annotation:
        profile_annotation(SplitLM(build(shapes[-1], device, dtype), compile=args.compile), g)
        return
    for shape in shapes:
        t0 = time.perf_counter()
        lm = build(shape, device, dtype)
        r = {"build_s": round(time.perf_counter() - t0, 1)}
        split = SplitLM(lm)  # L = half the layers: the upper half runs per candidate
        small = args.tiny
        compiled = SplitLM(lm, compile=True) if args.compile else None
        r["annotation_M90"] = annotation(split, 90, 230, 10, 10, 1 if small else 5, g, compiled)
        print(shape, "annotation", r["annotation_M90"], flush=True)
        if args.annotation_only:
            results[shape] = r
            continue
        r["inference_tokens_per_s"], r["inference_s_per_prompt"] = inference_tps(split, 4 if small else 16, 230, 8 if small else 20, g)
        print(shape, "inference", r["inference_tokens_per_s"], flush=True)
        r["finetune_tokens_per_s"] = finetune_tps(lm, 2 if small else 8, 64 if small else 256, 2 if small else 5)
        print(shape, "finetune", r["finetune_tokens_per_s"], flush=True)
        results[shape] = r
        del lm, split, compiled
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        open(args.out, "w").write(text)


if __name__ == "__main__":
    main()
