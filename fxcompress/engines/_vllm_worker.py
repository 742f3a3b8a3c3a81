"""Run inside the Python where vLLM is installed (``python _vllm_worker.py REQUEST RESULT``):
score token windows with vLLM's ``LLM`` and write the summed negative log-likelihood.

Self-contained on purpose: it imports vLLM and the standard library only, never fxcompress,
so it runs in a separate environment whose pins (torch, transformers, compressed-tensors) need
not match fxcompress's. The request is JSON: ``checkpoint``, ``dtype``, ``windows`` (lists of
token ids), ``enforce_eager`` (skip vLLM's
compilation). The result is JSON: ``nll`` (summed over every predicted token), ``tokens``,
``version``, ``cpu`` (vLLM runs on its CPU backend), ``amx`` (the CPU has AMX tiles: where vLLM
takes its W4A8 int4 path), ``w4a8`` (vLLM's ``VLLM_CPU_INT4_W4A8`` switch as it read it).
"""

import json
import sys


def score(request: dict) -> dict:
    import torch
    import vllm
    from vllm import LLM, SamplingParams, envs
    from vllm.platforms import current_platform

    windows = request["windows"]
    seqlen = max(len(w) for w in windows)
    llm = LLM(model=request["checkpoint"], dtype=request["dtype"], max_model_len=seqlen + 1,
              max_num_seqs=request.get("max_num_seqs", 8), seed=0,
              enforce_eager=request.get("enforce_eager", False))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    prompts = [{"prompt_token_ids": list(w)} for w in windows]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    nll, tokens = 0.0, 0
    for window, out in zip(windows, outputs, strict=True):
        # position 0 has no prediction; every later one holds the logprob of the prompt token
        for pos, logprobs in enumerate(out.prompt_logprobs[1:], start=1):
            nll -= logprobs[window[pos]].logprob
            tokens += 1
    return {"nll": nll, "tokens": tokens, "version": vllm.__version__,
            "cpu": bool(current_platform.is_cpu()),
            "amx": bool(torch.cpu._is_amx_tile_supported()),
            "w4a8": bool(envs.VLLM_CPU_INT4_W4A8)}


def main() -> None:
    request_path, result_path = sys.argv[1], sys.argv[2]
    with open(request_path) as f:
        request = json.load(f)
    result = score(request)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
