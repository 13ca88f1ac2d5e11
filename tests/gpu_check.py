"""GPU check (no network needed): one SGPO step in bf16 on a tiny Qwen-shaped model with Qwen's
vocabulary size, with DDP and with FSDP (torchrun, world size 1), generation, scoring, teacher pass
and checkpoint included; prints peak GPU memory and the step's time split. Run by
tests/gpu_check.sh; on a CPU a scaled-down smoke run (no warm-up, fp32, no memory figures).

    bash tests/gpu_check.sh
    # or: python tests/gpu_check.py build DIR; torchrun ... gpu_check.py run DIR fsdp
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

import sgpo  # noqa: E402
from tests.conftest import tiny_rows  # noqa: E402
from toy.tiny import build_tokenizer, write_jsonl  # noqa: E402


def build(folder):
    """Qwen2.5-style proportions (GQA 4:1, head_dim 128) at 4 layers; vocab 151,936 so that the LM
    head, the sampler's [N, V] log-softmax and the KD chunks have their real size. The char
    tokenizer uses its first 100 ids."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, head_dim=128,
            max_position_embeddings=2048, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False
        )
    )
    model.save_pretrained(os.path.join(folder, "model"))
    tok.save_pretrained(os.path.join(folder, "model"))
    write_jsonl(os.path.join(folder, "train.jsonl"), tiny_rows(64))


def run(folder, fsdp):
    out = os.path.join(folder, f"run-fsdp-{fsdp}")
    gpu = torch.cuda.is_available()  # on a CPU: a smoke run of the script itself, scaled down
    args = [
        "--model", os.path.join(folder, "model"), "--data", os.path.join(folder, "train.jsonl"),
        "--output_dir", out, "--overwrite_output_dir", "--fsdp", fsdp, "--dtype",
        "bf16" if gpu else "fp32", "--sft_learning_rate", "3e-3", "--sft_epochs",
        "10" if gpu else "0", "--learning_rate", "1e-6", "--max_steps", "2" if gpu else "1",
        "--batch_size", "16" if gpu else "2", "--num_generations", "8", "--num_guided_generations",
        "4", "--max_completion_length", "64" if gpu else "8", "--generation_batch_size",
        "96" if gpu else "12", "--micro_batch_size", "16", "--gradient_checkpointing", "true",
        "--kl_clip", "1.0", "--eval_data", ""
    ]
    assert sgpo.main(args) == 0
    if int(os.environ.get("RANK", 0)) == 0:
        last = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
        peak = (
            f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
            if torch.cuda.is_available()
            else "n/a (CPU)"
        )
        keys = (
            "time/generate", "time/grade", "time/select", "time/update", "perf/gen_tokens_per_s",
            "kd/target_frac", "loss/kd", "rollout_probs_diff_max", "grad_norm"
        )
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(
            f"gpu_check fsdp={fsdp} device={device} peak_allocated={peak} "
            + " ".join(f"{k}={last[k]:.4g}" for k in keys),
            flush=True,
        )


if __name__ == "__main__":
    build(sys.argv[2]) if sys.argv[1] == "build" else run(sys.argv[2], sys.argv[3])
