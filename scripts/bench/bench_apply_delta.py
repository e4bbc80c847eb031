"""Peak memory and wall time of the streaming `apply_delta` against the naive whole-state-dict approach.

Usage (with the ferret package installed, e.g. `pip install -e .`):
    python scripts/bench/bench_apply_delta.py                 # a ~1B-parameter LLaMA-shaped model
    python scripts/bench/bench_apply_delta.py --params 0.3e9  # quicker
    python scripts/bench/bench_apply_delta.py --params 7e9 --workdir /big/disk   # Ferret-7B sized (~55 GB disk)

It writes a random fp16 base (vocab 32000) and a Ferret-style delta (vocab 32001 + the 18 multimodal tensors)
as sharded safetensors into a temporary folder, then runs, each in a fresh subprocess:
  (a) streaming: `python -m ferret.weights.apply_delta` (one tensor at a time);
  (b) naive: load both state dicts whole, add (fp32, cast to fp16) in place, save with huggingface_hub's
      `save_torch_state_dict` (what `save_pretrained` does) - the original's approach without the model classes.
Peak RSS is the child's VmHWM (read by the child itself at the end), wall time is measured around the child;
the input files are read once beforehand so both runs start with the same (warm) page cache. The two outputs are then compared bit for bit.

Measured on 2 shared CPU cores (load average ~13, so wall times are noisy), 23 GiB RAM, torch 2.13 CPU:
    --params 1e9:   streaming 672 MiB / 73.8 s, naive 4,519 MiB / 78.8 s (imports alone: 234 MiB)
    --params 0.3e9: streaming 513 MiB / 13.2 s, naive 1,667 MiB / 14.1 s
Streaming peak RSS is the imports plus about three times the largest tensor (embed_tokens), whatever the model
size; the naive peak grows with the model (about two whole models plus save buffers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 32000


def llama_dims(params: float) -> tuple[int, int, int]:
    """(hidden, ffn, layers) of a LLaMA-shaped model with about `params` parameters (vocab 32000)."""
    hidden = 4096 if params >= 5e9 else 2048 if params >= 0.8e9 else 1024 if params >= 0.2e9 else 512
    ffn = int(hidden * 2.6875) // 64 * 64  # 11008 at hidden 4096, as LLaMA-7B
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    layers = max(1, round((params - 2 * VOCAB * hidden - hidden) / per_layer))
    return hidden, ffn, layers


def shapes(hidden: int, ffn: int, layers: int, vocab: int, multimodal: bool) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of a Ferret model of these sizes, read off the model class built on the meta device
    (nothing is allocated); without `multimodal` only the LLaMA tensors, as in a Vicuna base."""
    import torch

    from ferret.model.apply_delta import is_multimodal
    from ferret.model.configuration import FerretConfig
    from ferret.model.modeling import FerretLlamaForCausalLM

    config = FerretConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                          num_attention_heads=max(1, hidden // 128), vocab_size=vocab, im_region_fea_token=vocab - 1,
                          mm_vision_tower=None)
    with torch.device("meta"):
        model = FerretLlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if multimodal or not is_multimodal(name)}


def write_random_checkpoint(folder: Path, tensor_shapes: dict[str, tuple[int, ...]], seed: int, shard: str) -> int:
    """Random fp16 tensors written one at a time with the streaming writer; returns the parameter count."""
    import torch

    from ferret.model.checkpoint import ShardedSafetensorsWriter, TensorSpec

    folder.mkdir(parents=True)
    specs = [TensorSpec(name, shape, torch.float16) for name, shape in tensor_shapes.items()]
    gen = torch.Generator().manual_seed(seed)
    with ShardedSafetensorsWriter(folder, specs, shard) as writer:
        for spec in specs:
            writer.write(spec.name, (torch.randn(spec.shape, generator=gen) * 0.02).half())
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16"}))
    return sum(spec.numel for spec in specs)


def naive_apply_delta(base: str, delta: str, out: str, shard: str) -> None:
    """The whole-state-dict way: both models in memory at once."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    def load_all(folder: str) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(file))
        return state

    base_state, delta_state = load_all(base), load_all(delta)
    for name, d in delta_state.items():
        b = base_state.get(name)
        if b is None:  # the multimodal tensors, stored absolute
            continue
        t = d.float()
        t[tuple(slice(0, n) for n in b.shape)] += b.float()  # the whole tensor, or the top rows of embeddings
        d.copy_(t)
    Path(out).mkdir()
    save_torch_state_dict(delta_state, out, max_shard_size=shard)
    shutil.copy(Path(delta) / "config.json", Path(out) / "config.json")


def peak_rss_kib() -> int:
    """VmHWM of this process: the peak resident set of its own memory map since exec.

    (ru_maxrss of a child is not used: Linux carries the parent's high-water mark across fork and exec, so a
    child of a big parent reports at least the parent's size.)
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(job: str, job_args: list[str]) -> None:
    """Run one measured job in this (fresh) process and print its peak RSS as the last line."""
    if job == "stream":
        from ferret.weights.apply_delta import main as apply_delta_main

        base, delta, out, shard = job_args
        rc = apply_delta_main(
            ["--base-model-path", base, "--target-model-path", out, "--delta-path", delta, "--max-shard-size", shard]
        )
        if rc:
            raise SystemExit(rc)
    elif job == "naive":
        naive_apply_delta(*job_args)
    else:  # "idle": what the interpreter and the imports alone take
        import safetensors  # noqa: F401
        import torch  # noqa: F401

        import ferret.weights.apply_delta  # noqa: F401
    print(f"PEAK_RSS_KIB {peak_rss_kib()}", flush=True)


def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `cmd`, a child that prints PEAK_RSS_KIB as its last line."""
    with open(log, "w") as out:
        start = time.perf_counter()
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
    text = log.read_text()
    if rc != 0 or "PEAK_RSS_KIB" not in text:
        print(text[-3000:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}")
    return wall, int(text.rsplit("PEAK_RSS_KIB", 1)[1].split()[0]) / 1024


def warm(folders: list[Path]) -> None:
    for folder in folders:
        for file in folder.iterdir():
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9, help="parameters of the base model (default 1e9)")
    parser.add_argument("--shard-size", default="500MB", help="shard size of the generated inputs and outputs")
    parser.add_argument("--workdir", default=None, help="where the temporary folder goes (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--quick", action="store_true", help="a 0.05B-parameter model (about a minute)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.params, args.shard_size = 5e7, "50MB"
    if args.child:
        child(args.child[0], args.child[1:])
        return 0

    from ferret.weights.verify import compare_checkpoints

    hidden, ffn, layers = llama_dims(args.params)
    work = Path(tempfile.mkdtemp(prefix="bench_apply_delta-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        n_base = write_random_checkpoint(work / "base", shapes(hidden, ffn, layers, VOCAB, False), 0, args.shard_size)
        n_delta = write_random_checkpoint(
            work / "delta", shapes(hidden, ffn, layers, VOCAB + 1, True), 1, args.shard_size
        )
        print(
            f"base: {n_base / 1e9:.2f}B params (hidden {hidden}, ffn {ffn}, {layers} layers, fp16, "
            f"{n_base * 2 / 2**30:.2f} GiB); delta: {n_delta / 1e9:.2f}B params; written in "
            f"{time.perf_counter() - t0:.0f} s to {work}",
            flush=True,
        )
        inputs = [str(work / "base"), str(work / "delta")]
        runs = {
            "imports only (python, torch, ferret)": ["idle"],
            "streaming apply_delta": ["stream", *inputs, str(work / "out_stream"), args.shard_size],
            "naive (both state dicts whole)": ["naive", *inputs, str(work / "out_naive"), args.shard_size],
        }
        results = {}
        for label, job in runs.items():
            warm([work / "base", work / "delta"])
            results[label] = run_measured([sys.executable, __file__, "--child", *job], work / f"{job[0]}.log")
            print(f"  done: {label}", flush=True)

        same = compare_checkpoints(work / "out_naive", work / "out_stream", atol=0, rtol=0)
        print(f"\noutputs identical bit for bit: {same.equal}")
        print(f"\n| method | peak RSS (MiB) | wall (s) |\n|---|---:|---:|")
        for label, (wall, rss) in results.items():
            print(f"| {label} | {rss:,.0f} | {wall:.1f} |")
        (ws, rs), (wn, rn) = results["streaming apply_delta"], results["naive (both state dicts whole)"]
        print(f"\nnaive / streaming: peak RSS x{rn / rs:.1f}, wall time x{wn / ws:.2f}")
        return 0 if same.equal else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
