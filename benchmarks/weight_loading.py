"""4/8-bit weight loading (bitsandbytes, CUDA) through tqlab's loader, with capture in the loop.

    python benchmarks/weight_loading.py            # on a CUDA machine; writes a section of docs/benchmarks.md

A GPU machine without a hub gets a randomly initialised Llama-architecture model saved locally (weights
don't matter for the check): it is loaded with weight_load = none / 8bit / 4bit, a forward pass runs
with the attention recorder, and the table shows the weight bytes, the layer types bitsandbytes put in,
and how far the captured keys and logits move from the bf16 load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from docs_section import write_section

from tqlab.capture.hooks import AttentionRecorder
from tqlab.capture.models import load_model


def save_random_llama(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(1024)} | {"<unk>": 1024, "</s>": 1025}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=1026,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/bench/benchmarks.md"), help="'-' to print only"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("weight loading through bitsandbytes needs a CUDA GPU")
    folder = Path(tempfile.mkdtemp()) / "random-llama"
    save_random_llama(folder)
    ids = torch.randint(0, 1024, (2, 256), generator=torch.Generator().manual_seed(1)).cuda()
    rows, reference = [], None
    for weight_load in ("none", "8bit", "4bit"):
        loaded = load_model(str(folder), dtype="bfloat16", weight_load=weight_load, device="cuda")
        model = loaded.model
        with torch.no_grad(), AttentionRecorder(model, layers=[0, 7]) as rec:
            logits = model(ids, use_cache=False).logits.float()
        keys = rec.layers[7].key.float()
        if reference is None:
            reference = (logits, keys)
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        linear = type(model.model.layers[0].self_attn.k_proj).__name__
        rows.append(
            f"| {weight_load} | {linear} | {model.get_memory_footprint() / 2**20:.1f} "
            f"| {rel(keys, reference[1]):.4f} | {rel(logits, reference[0]):.4f} | {tuple(keys.shape)} |"
        )
        del model, loaded
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    import bitsandbytes
    import transformers

    table = [
        "| weight_load | k_proj type | weights MiB | layer-7 keys rel. diff vs none | logits rel. diff vs none | keys shape |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    section = "\n".join(
        [
            "## 4/8-bit weight loading (bitsandbytes)",
            "",
            f"`python {' '.join(sys.argv)}` on {device}: torch {torch.__version__}, transformers "
            f"{transformers.__version__}, bitsandbytes {bitsandbytes.__version__}. Random Llama-architecture "
            "model (8 layers, 16/4 heads, head_dim 64, hidden 1024) saved locally, then loaded through "
            "`tqlab.capture.models.load_model`; forward pass of 2 × 256 tokens with the attention recorder.",
            "",
            *table,
        ]
    )
    print(section)
    if str(args.out) != "-":
        write_section(args.out, "weight_loading", section)


if __name__ == "__main__":
    main()
