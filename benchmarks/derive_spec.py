"""Spec of a full-size architecture from its config alone: wall time and peak memory.

Writes Llama-2-7B's ``config.json`` (no weights) to a temporary folder and derives its spec with
``findlady_core.derive.spec_from_config``: build on the meta device, ``torch.export``, axis
rules, and the self-check on a shrunk float64 copy. Peak memory is the process's maximum
resident set size (imports included) and its growth over the derivation. Targets: under 30 s
and under 1 GB.

    python -m benchmarks.derive_spec [--no-self-check] [--families] [--out FILE]

``--families`` also derives the spec of a tiny random-init config of each family in
``FAMILIES`` (self-checked) and prints groups, neurons and warnings, the table of
docs/families.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}

# model_type, architecture: tiny configs from the family's own config class, shrunk
FAMILIES = [
    ("bert", "BertForSequenceClassification"), ("roberta", "RobertaForSequenceClassification"),
    ("distilbert", "DistilBertForSequenceClassification"), ("albert", "AlbertForSequenceClassification"),
    ("gpt2", "GPT2LMHeadModel"), ("opt", "OPTForCausalLM"), ("gpt_neox", "GPTNeoXForCausalLM"),
    ("gptj", "GPTJForCausalLM"), ("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"), ("gemma", "GemmaForCausalLM"),
    ("phi", "PhiForCausalLM"), ("falcon", "FalconForCausalLM"), ("bloom", "BloomForCausalLM"),
    ("t5", "T5ForConditionalGeneration"), ("bart", "BartModel"), ("vit", "ViTForImageClassification"),
    ("resnet", "ResNetForImageClassification"), ("convnext", "ConvNextForImageClassification"),
    ("mobilenet_v2", "MobileNetV2ForImageClassification"),
]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def llama(self_check: bool) -> dict:
    import torch

    from findlady_core.derive import spec_from_config

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(LLAMA2_7B))
        before = _rss_mb()
        start = time.perf_counter()
        spec = spec_from_config(json.loads(path.read_text()), self_check=self_check)
        seconds = time.perf_counter() - start
    return {"model": "Llama-2-7B (config only)", "seconds": round(seconds, 2), "peak_rss_mb": round(_rss_mb()),
            "rss_growth_mb": round(_rss_mb() - before), "groups": len(spec.groups), "neurons": spec.neurons,
            "self_check": spec.meta.get("self_check"), "warnings": list(spec.warnings)}


def families() -> list[dict]:
    from transformers import CONFIG_MAPPING

    from findlady_core.derive import spec_from_config
    from findlady_core.derive.config import shrink
    from findlady_core.errors import SpecError

    rows = []
    for mt, arch in FAMILIES:
        cfg = shrink(json.loads(CONFIG_MAPPING[mt]().to_json_string()))
        cfg["architectures"] = [arch]
        try:
            spec = spec_from_config(cfg)
            rows.append({"family": mt, "architecture": arch, "groups": len(spec.groups), "neurons": spec.neurons,
                         "warnings": list(spec.warnings)})
        except SpecError as e:
            rows.append({"family": mt, "architecture": arch, "refused": str(e)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.derive_spec", description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-self-check", action="store_true", help="time the derivation alone")
    ap.add_argument("--families", action="store_true", help="also derive tiny configs of many families")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args(argv)
    res: dict = {"llama2_7b": llama(not args.no_self_check)}
    r = res["llama2_7b"]
    print(f"{r['model']}: {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB (+{r['rss_growth_mb']} MB), "
          f"{r['groups']} groups, {r['neurons']} neurons")
    if args.families:
        res["families"] = families()
        print("| family | architecture | groups | neurons | warnings / refusal |")
        print("|---|---|---|---|---|")
        for row in res["families"]:
            note = row.get("refused") or "; ".join(w[:160] for w in row["warnings"]) or "-"
            print(f"| {row['family']} | {row['architecture']} | {row.get('groups', '-')} | {row.get('neurons', '-')} | {note} |")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
