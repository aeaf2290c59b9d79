"""The PyTorch side of `cargo bench --bench minilm`: all-MiniLM-L6-v2 on the same padded batch
(sentences 0-31, 32 x 25), dense and with every Linear factorized at rank 64 and 128 (by weight
SVD; the ranks of the bench's variants), timed interleaved, medians of ROUNDS.

Not part of the test suite (it needs PyTorch: `pip install torch safetensors`); run it beside the
criterion bench so that both see the machine in the same state:

    python3 benches/minilm_torch.py [../shared/data/minilm-model] [ROUNDS]

The dense model is checked against the reference embeddings before it is timed.
"""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
root = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/minilm-model"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
weights = load_file(f"{root}/model.safetensors")
ids = json.load(open(f"{root}/sentences.json"))["input_ids"][:32]
longest = max(map(len, ids))
input_ids = torch.tensor([s + [0] * (longest - len(s)) for s in ids])
mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in ids])
bias = (1 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def linear(name, rank):
    """`x -> x W^T + b`, or its rank-`rank` pair where that saves multiply-adds."""
    w, b = weights[name + ".weight"], weights[name + ".bias"]
    out, inner = w.shape
    if rank is None or rank * (out + inner) >= out * inner:
        return lambda x: F.linear(x, w, b)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    first, second = (vh[:rank] * s[:rank, None]).contiguous(), u[:, :rank].contiguous()
    return lambda x: F.linear(F.linear(x, first), second, b)


def model(rank):
    def norm(name):
        return weights[name + ".weight"], weights[name + ".bias"]

    layers = []
    for n in range(6):
        p = f"encoder.layer.{n}."
        layers.append(
            dict(
                q=linear(p + "attention.self.query", rank),
                k=linear(p + "attention.self.key", rank),
                v=linear(p + "attention.self.value", rank),
                o=linear(p + "attention.output.dense", rank),
                ln1=norm(p + "attention.output.LayerNorm"),
                up=linear(p + "intermediate.dense", rank),
                down=linear(p + "output.dense", rank),
                ln2=norm(p + "output.LayerNorm"),
            )
        )

    def forward():
        b, s = input_ids.shape
        x = (
            weights["embeddings.word_embeddings.weight"][input_ids]
            + weights["embeddings.position_embeddings.weight"][:s]
            + weights["embeddings.token_type_embeddings.weight"][0]
        )
        x = F.layer_norm(x, (384,), *norm("embeddings.LayerNorm"), 1e-12)
        for l in layers:
            def heads(t):
                return t.view(b, s, 12, 32).transpose(1, 2)

            a = F.scaled_dot_product_attention(
                heads(l["q"](x)), heads(l["k"](x)), heads(l["v"](x)), attn_mask=bias
            )
            a = a.transpose(1, 2).reshape(b, s, 384)
            x = F.layer_norm(x + l["o"](a), (384,), *l["ln1"], 1e-12)
            x = F.layer_norm(x + l["down"](F.gelu(l["up"](x))), (384,), *l["ln2"], 1e-12)
        m = mask[..., None].float()
        return F.normalize((x * m).sum(1) / m.sum(1), dim=-1)

    return forward


variants = {"dense": model(None), "rank64": model(64), "rank128": model(128)}
with torch.inference_mode():
    reference = load_file(f"{root}/reference.safetensors")["embeddings"][:32]
    worst = (variants["dense"]() * reference).sum(1).min().item()
    assert worst > 0.99999, f"dense PyTorch model differs from the reference: cosine {worst}"
    times = {k: [] for k in variants}
    for f in variants.values():
        for _ in range(3):
            f()
    for _ in range(rounds):
        for k, f in variants.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
print(
    f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch "
    f"{tuple(input_ids.shape)}, {int(mask.sum())} real tokens, medians of {rounds}; "
    f"dense min cosine to reference {worst:.6f}"
)
for k, m in median.items():
    print(f"{k:8} {m:7.1f} ms  {median['dense'] / m:4.2f}x over dense")
