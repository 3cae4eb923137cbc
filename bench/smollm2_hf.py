"""Write the embedded SmolLM2-135M-Instruct as a Hugging Face directory (float32 safetensors).

vLLM and other servers load HF directories, not the GGUF file pdmesh embeds; this converts that
very file through transformers' own GGUF loader (the oracle the engine tests use), so both
servers in a comparison read the same weights:

    python bench/smollm2_hf.py /tmp/smollm2-hf
    pdmesh up --model /tmp/smollm2-hf ...        vllm serve /tmp/smollm2-hf ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.weights.default_model import default_model_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the directory to write (created)")
    args = parser.parse_args()
    import transformers

    gguf = default_model_path()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF load as quantized and refuses to save it: the same weights go
    # into a plain model of the same config instead.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} (float32, from {gguf.name})")


if __name__ == "__main__":
    main()
