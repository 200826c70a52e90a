"""Rollout and evaluation seconds of the HF engine on the tiny CPU run's two workloads, against the
engine as it was before (the baseline, kept here): ``torch.multinomial`` over the whole vocabulary,
a full sort of it for top-p, every row decoded until the last one stops, one thread. Both in this
process, one after the other, on the same model and prompts.

    python benchmarks/rollout_speed.py [--model outputs/tiny_qwen3] [--data outputs/synthetic]

The workloads are those of ``configs/tiny_cpu.yaml``: a step's rollouts (8 train prompts x 8
samples, 12 new tokens, temperature 1) and the final evaluation (32 test prompts x 16 samples,
temperature 0.6, top-p 0.95, decode batches of 256). The engine runs with the threads the trainer
gives it (``--threads``: the 2 local ranks' one each). The two engines sample differently, so their
tokens differ; the mean response length and the eval accuracy of each are printed as a check that
they sample the same distribution (within the noise of the sample sizes).

``--sglang-python .venv-sglang/bin/python`` adds a real SGLang 0.5.23 server on the CPU (launched
here, serving the same model in fp32, its threads on the cores of NUMA node 0, HTTP requests as
the trainer sends them), timed on the same workloads and printed as a ratio against the HF engine.
"""

import argparse
import json
import statistics
import time

import torch

from srpo_megatron.data.rows import load_rows
from srpo_megatron.data.templating import tokenize_and_filter
from srpo_megatron.data.tokenizer import load_tokenizer
from srpo_megatron.rewards import score_science_mcq
from srpo_megatron.rollout.engine import FinishReason, SamplingParams
from srpo_megatron.rollout.hf_engine import HFEngine
from srpo_megatron.runtime.quiet import silence_known_noise
from srpo_megatron.trainer.rollouts import stop_token_ids


def baseline_sample_top_p(logits, temperature, top_p, generator):
    scaled = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    logp_all = scaled - scaled.logsumexp(-1, keepdim=True)
    token = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
    return token, logp_all.gather(-1, token[:, None]).squeeze(-1)


class BaselineEngine(HFEngine):
    """The decode loop before: finished rows stay in the batch (as padding) until every row stops."""

    def _generate_batch(self, prompts, params, generator):
        n = len(prompts)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        stop = torch.tensor(params.stop_token_ids or [-1])
        done = torch.zeros(n, dtype=torch.bool)
        tokens, logps, past, step_ids = [], [], None, input_ids
        for _ in range(params.max_new_tokens):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            out = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = out.past_key_values
            token, logp = baseline_sample_top_p(
                out.logits[:, -1], params.temperature, params.top_p, generator
            )
            token = token.masked_fill(done, self.pad_token_id)
            tokens.append(token)
            logps.append(logp)
            mask = torch.cat([mask, (~done).long()[:, None]], dim=-1)
            done = done | torch.isin(token, stop)
            step_ids = token[:, None]
            if done.all():
                break
        tokens_t, logps_t = torch.stack(tokens, 1), torch.stack(logps, 1)
        lengths = mask[:, width:].sum(-1)
        responses = [tokens_t[i, : lengths[i]].tolist() for i in range(n)]
        stop_set = set(params.stop_token_ids)
        reasons: list[FinishReason] = ["stop" if r and r[-1] in stop_set else "length" for r in responses]
        return responses, [logps_t[i, : lengths[i]].clone() for i in range(n)], reasons


def measure(engine, prompts, params, tokenizer, repeats: int):
    """(median seconds, mean response length, accuracy) over ``repeats`` seeds."""
    seconds, lengths, scores = [], [], []
    for seed in range(repeats):
        start = time.perf_counter()
        batch = engine.generate([p.prompt_ids for p in prompts], SamplingParams(**params, seed=seed))
        seconds.append(time.perf_counter() - start)
        lengths += [len(r) for r in batch.response_ids]
        for i, response in zip(batch.prompt_index, batch.response_ids, strict=True):
            text = tokenizer.decode(response, skip_special_tokens=True)
            scores.append(score_science_mcq(text, prompts[i].row.ground_truth).score)
    return statistics.median(seconds), statistics.fmean(lengths), statistics.fmean(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/tiny_qwen3", help="examples/run_tiny_cpu.sh makes it")
    parser.add_argument("--data", default="outputs/synthetic")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="seeds per workload and engine")
    parser.add_argument("--sglang-python", help="also a real SGLang server run by this Python")
    args = parser.parse_args()
    silence_known_noise()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.model)
    stops = tuple(stop_token_ids(tokenizer))
    workloads = {
        "rollout": (
            f"{args.data}/train.parquet",
            8,
            dict(n=8, temperature=1.0, top_p=1.0, max_new_tokens=12),
        ),
        "eval": (f"{args.data}/test.parquet", 32, dict(n=16, temperature=0.6, top_p=0.95, max_new_tokens=12)),
    }
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    engines = {
        "baseline": BaselineEngine(model, pad_token_id=tokenizer.pad_token_id, max_batch_size=256),
        "engine": HFEngine(
            model, pad_token_id=tokenizer.pad_token_id, max_batch_size=256, num_threads=args.threads
        ),
    }
    print(f"model {args.model}, {torch.get_num_threads()} thread (baseline), {args.threads} (engine)")
    server = None
    if args.sglang_python:
        from pathlib import Path

        from srpo_megatron.rollout.sglang_engine import SGLangEngine
        from srpo_megatron.rollout.sglang_server import ServerSpec, launch_server, wait_until_healthy
        from srpo_megatron.runtime.distributed import find_free_port

        spec = ServerSpec(
            args.model, port=find_free_port(), dtype="float32", python=args.sglang_python, device="cpu"
        )
        server = launch_server(spec, Path("outputs/benchmarks"))
        wait_until_healthy([server], timeout_s=900)
        engines["sglang"] = SGLangEngine.connect(server.url, timeout_s=900)
    try:
        summary = _run(engines, workloads, tokenizer, stops, args)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps({"benchmark": "rollout_speed", "threads": args.threads, **summary}))


def _run(engines, workloads, tokenizer, stops, args) -> dict:
    summary = {}
    for name, (path, num_prompts, params) in workloads.items():
        prompts, _ = tokenize_and_filter(load_rows(path)[:num_prompts], tokenizer, 256)
        params = {**params, "stop_token_ids": stops}
        figures = {}
        for which, engine in engines.items():
            figures[which] = measure(engine, prompts, params, tokenizer, args.repeats)
            s, length, acc = figures[which]
            print(f"{name:8s} {which:9s} {s:7.2f} s   response length {length:5.2f}   accuracy {acc:.3f}")
        ratio = figures["engine"][0] / figures["baseline"][0]
        print(f"{name:8s} ratio engine / baseline: {ratio:.3f}")
        summary[name] = {
            "baseline_s": round(figures["baseline"][0], 3),
            "engine_s": round(figures["engine"][0], 3),
            "ratio": round(ratio, 3),
        }
        if "sglang" in figures:
            sglang_ratio = figures["sglang"][0] / figures["engine"][0]
            print(f"{name:8s} ratio sglang / engine: {sglang_ratio:.3f}")
            summary[name] |= {
                "sglang_s": round(figures["sglang"][0], 3),
                "sglang_ratio": round(sglang_ratio, 3),
            }
    return summary


if __name__ == "__main__":
    main()
