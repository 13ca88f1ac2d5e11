"""Peak memory and time of the KD loss (forward + backward) on CPU, chunked vs plain, at Qwen's
vocabulary size.

    python tests/bench_kd_memory.py            # prints a table; each case runs in a fresh process
    python tests/bench_kd_memory.py chunked 4096 20000 128   # mode, positions, vocabulary, chunk
Peak RSS minus the RSS before the loss = the loss's own extra memory. MALLOC_MMAP_THRESHOLD_ makes
glibc return every freed tensor to the OS, so that RSS follows live tensors rather than allocator
caching.
"""

import os
import resource
import subprocess
import sys
import time

H = 64


def case(mode: str, T: int, V: int = 151_936, chunk: int = 256) -> None:
    import torch

    sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
    import chunked_head
    import sgpo

    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False)
    s_h = torch.randn(T, H, requires_grad=True)
    t_h = torch.randn(T, H)
    targets = torch.randint(V, (T,))
    base, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    if mode == "chunked":
        div, _ = chunked_head.kd_divergence(s_h, t_h, targets, head, 1.0, "fkl", chunk_size=chunk)
    else:
        div = sgpo.per_token_kl(head(s_h), head(t_h).detach())
    div.clamp(max=1.0).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chunk_text = chunk if mode == "chunked" else "-"
    seconds = time.perf_counter() - t0
    print(f"{mode}\t{T}\t{chunk_text}\t{(peak - base) / 2**20:.3f}\t{seconds:.1f}")


if __name__ == "__main__":
    if len(sys.argv) >= 3:  # one case: mode, positions[, vocabulary, chunk]
        case(sys.argv[1], *map(int, sys.argv[2:]))
    else:
        print("mode\ttokens\tchunk\textra peak GiB (V=151936, fp32)\tseconds")
        cases = [("plain", 1024, 0), ("plain", 2048, 0), ("plain", 4096, 0)] + [
            ("chunked", T, c) for T in (2048, 8192) for c in (128, 256, 512, 1024)
        ]
        for mode, T, c in cases:
            out = subprocess.run(
                [sys.executable, __file__, mode, str(T), "151936", str(c)], capture_output=True,
                text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            )
            print(out.stdout.strip() or out.stderr.strip().splitlines()[-1])
