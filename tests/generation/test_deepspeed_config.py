"""The one DeepSpeed builder: presets, offload switches, precision."""

from incr_ray.config import DeepSpeedSection
import pytest

from incr_ray.generation.deepspeed_config import build_deepspeed_config, precision_problem, resolve_precision


def test_stages_and_zero3_consolidated_save():
    for stage in (0, 1, 2, 3):
        ds = build_deepspeed_config(DeepSpeedSection(stage=stage), on_gpu=False, precision="fp32")
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == "auto"  # the HF Trainer fills it
    z3 = build_deepspeed_config(DeepSpeedSection(stage=3), on_gpu=True, precision="bf16")
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert z3["bf16"]["enabled"] and not z3["fp16"]["enabled"]
    for stage in (1, 2, 3):  # the Trainer fills these from the model's hidden size
        ds = build_deepspeed_config(DeepSpeedSection(stage=stage), on_gpu=True, precision="bf16")
        assert ds["zero_optimization"]["reduce_bucket_size"] == "auto"


def test_gradients_accumulate_in_fp32():
    for precision in ("bf16", "fp16", "fp32"):
        ds = build_deepspeed_config(DeepSpeedSection(stage=1), on_gpu=True, precision=precision)
        assert ds["data_types"]["grad_accum_dtype"] == "fp32"


def test_offload_switches_and_optimizer_choice():
    cpu = build_deepspeed_config(DeepSpeedSection(stage=3, offload_optimizer=True, offload_params=True),
                                 on_gpu=False, precision="fp32")
    assert cpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cpu["optimizer"]["params"]["torch_adam"] is True  # no compiled CPU Adam needed on CPU
    gpu = build_deepspeed_config(DeepSpeedSection(stage=2, offload_optimizer=True), on_gpu=True, precision="bf16")
    assert "torch_adam" not in gpu["optimizer"]["params"]  # DeepSpeed's CPU Adam next to a GPU model
    assert gpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is True


def test_precision_resolution():
    assert resolve_precision("auto", on_gpu=False, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=False) == "fp16"
    assert resolve_precision("bf16", on_gpu=False, bf16_supported=False) == "bf16"  # CPU bf16 runs
    assert resolve_precision("fp16", on_gpu=True, bf16_supported=True) == "fp16"


def test_impossible_precision_requests_are_refused():
    assert precision_problem("fp16", 2, on_gpu=False, bf16_supported=False) == (
        "deepspeed.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    assert "not supported by this GPU" in precision_problem("bf16", 2, on_gpu=True, bf16_supported=False)
    assert "fp32 master copy" in precision_problem("bf16", 0, on_gpu=True, bf16_supported=True)
    assert precision_problem("bf16", 1, on_gpu=False, bf16_supported=False) is None
    assert precision_problem("fp32", 0, on_gpu=True, bf16_supported=True) is None
    with pytest.raises(ValueError, match="fp32 master copy"):
        build_deepspeed_config(DeepSpeedSection(stage=0), on_gpu=True, precision="bf16")


def test_gradients_are_summed_across_workers_in_fp32_by_default():
    """DeepSpeed sums the ranks' gradients in the training dtype unless communication_data_type says
    otherwise; `deepspeed.grad_reduce_dtype: precision` gives that default back."""
    for stage, precision in ((0, "fp32"), (1, "bf16"), (2, "bf16"), (3, "bf16"), (2, "fp16"), (3, "fp32")):
        ds = build_deepspeed_config(DeepSpeedSection(stage=stage), on_gpu=True, precision=precision)
        assert ds["communication_data_type"] == "fp32", (stage, precision)
        own = build_deepspeed_config(DeepSpeedSection(stage=stage, grad_reduce_dtype="precision"), on_gpu=True,
                                     precision=precision)
        assert "communication_data_type" not in own


ENGINE_PROBE = r'''
import json, os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
import torch, deepspeed, deepspeed.comm as comm
from incr_ray.config import DeepSpeedSection
from incr_ray.generation.deepspeed_config import build_deepspeed_config

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo")
calls = []
for name in ("all_reduce", "reduce_scatter_fn"):  # what ZeRO-1/2 and ZeRO-3 reduce gradients with
    def spy(tensor, *a, _real=getattr(comm, name), _name=name, **k):
        calls.append((_name, str((tensor[0] if isinstance(tensor, (list, tuple)) else tensor).dtype)))
        return _real(tensor, *a, **k)
    setattr(comm, name, spy)
out = {}
for stage in (1, 2, 3):
    for reduce in ("fp32", "precision"):
        cfg = build_deepspeed_config(DeepSpeedSection(stage=stage, grad_reduce_dtype=reduce), on_gpu=False,
                                     precision="bf16")
        # The values the Hugging Face Trainer fills in for "auto".
        cfg.update(train_micro_batch_size_per_gpu=2, train_batch_size=2, gradient_accumulation_steps=1,
                   gradient_clipping=1.0)
        cfg["optimizer"]["params"].update(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0)
        zero = cfg["zero_optimization"]
        for key, value in (("reduce_bucket_size", 1000), ("stage3_prefetch_bucket_size", 1000),
                           ("stage3_param_persistence_threshold", 0)):
            if zero.get(key) == "auto":
                zero[key] = value
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        calls.clear()
        engine.backward(engine(torch.randn(2, 8, dtype=torch.bfloat16)).float().pow(2).mean())
        engine.step()
        out[f"{stage} {reduce}"] = {"engine": str(engine.communication_data_type),
                                    "optimizer": type(engine.optimizer).__name__, "collectives": sorted(set(calls))}
print("RESULT " + json.dumps(out))
'''


@pytest.mark.slow
def test_the_engine_reduces_bf16_gradients_in_fp32_at_every_zero_stage(tmp_path):
    """Built from our config, DeepSpeed 0.19.8's engine (1 gloo rank, a tiny model, bf16, on the CPU)
    reads communication_data_type, and the gradient collective of one step runs in it at ZeRO-1
    (BF16_Optimizer: the engine's all-reduce), ZeRO-2 (the ZeRO optimizer's all-reduce) and ZeRO-3
    (reduce-scatter). Stage 0 in bf16 is refused (precision_problem); fp16 needs a GPU."""
    import json
    import subprocess
    import sys

    from incr_ray.generation.local_group import free_port

    script = tmp_path / "probe.py"
    script.write_text(ENGINE_PROBE)
    done = subprocess.run([sys.executable, str(script), str(free_port())], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    optimizers = {1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}
    reduce_with = {1: "all_reduce", 2: "all_reduce", 3: "reduce_scatter_fn"}
    for stage in (1, 2, 3):
        fp32, own = out[f"{stage} fp32"], out[f"{stage} precision"]
        assert fp32["optimizer"] == own["optimizer"] == optimizers[stage]
        assert (fp32["engine"], own["engine"]) == ("torch.float32", "torch.bfloat16")
        sent, sent_own = {tuple(c) for c in fp32["collectives"]}, {tuple(c) for c in own["collectives"]}
        assert (reduce_with[stage], "torch.float32") in sent and (reduce_with[stage], "torch.bfloat16") not in sent, fp32
        assert (reduce_with[stage], "torch.bfloat16") in sent_own, own
