"""Run by tests/test_memory.py in its own process: a real DeepSpeed engine (gloo, CPU, one rank) per ZeRO
setting, one step; prints, as JSON, the bytes of the gradient reduce buckets it allocated during the backward."""
import json
import os
import socket
import sys

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(s.getsockname()[1]))
import deepspeed  # noqa: E402

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def bucket_bytes(stage, overlap, contiguous, bucket, dtype):
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage, "overlap_comm": overlap, "contiguous_gradients": contiguous,
                                 "reduce_bucket_size": bucket, "stage3_param_persistence_threshold": 10},
           "bf16": {"enabled": dtype == "bf16"},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    with deepspeed.zero.Init(config_dict_or_path=cfg, enabled=stage == 3):
        model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)])
    for p in model[:2].parameters():  # few trainable parameters (2112), far fewer than the bucket
        p.requires_grad = False
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    zero, seen = engine.optimizer, {}

    def record():
        for b in zero.ipg_buckets.values():
            for t in ([b.buffer] if torch.is_tensor(b.buffer) else b.buffer):
                seen[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
    if stage < 3:  # ZeRO-1/2 allocate the buckets at the first gradient of each backward, free them after
        setup = zero.setup_buckets
        zero.setup_buckets = lambda: (setup(), record())
    x = torch.randn(4, 32, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()
    if stage == 3:  # allocated once, at initialisation
        record()
    return sum(seen.values())


cases = [json.loads(a) for a in sys.argv[1:]]
print(json.dumps([bucket_bytes(**c) for c in cases]))
