"""Weight tools (apply_delta, make_delta, consolidate, extract, verify) on tiny checkpoints written here.

The tiny model is LLaMA-shaped with hidden size 8, two layers, the real vocabulary sizes (32000 rows in the
base, 32001 in Ferret) and the 18 multimodal tensors of a released delta, with small shapes.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ferret.weights import apply_delta as apply_delta_module  # noqa: E402
from ferret.weights.apply_delta import RELEASED_MULTIMODAL_NAMES, DeltaError, apply_delta, plan_delta  # noqa: E402
from ferret.model.checkpoint import (  # noqa: E402
    SAFETENSORS_INDEX_NAME,
    CheckpointError,
    CheckpointReader,
    ShardedSafetensorsWriter,
    TensorSpec,
    exit_cleanly_on_sigterm,
    parse_size,
    plan_shards,
)
from ferret.weights.consolidate import consolidate  # noqa: E402
from ferret.weights.extract import extract  # noqa: E402
from ferret.weights.extract import main as extract_main  # noqa: E402
from ferret.weights.make_delta import make_delta  # noqa: E402
from ferret.weights.verify import compare_checkpoints  # noqa: E402
from ferret.weights.verify import main as verify_main  # noqa: E402

H, FFN, LAYERS, VOCAB = 8, 12, 2, 32000
SIDE = {
    "config.json": json.dumps({"model_type": "ferret", "vocab_size": VOCAB + 1, "torch_dtype": "float16"}),
    "tokenizer_config.json": json.dumps({"model_max_length": 2048}),
    "special_tokens_map.json": "{}",
    "tokenizer.model": "not really a sentencepiece model",
}


def llama_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            shapes[p + f"self_attn.{proj}_proj.weight"] = (H, H)
        shapes[p + "mlp.gate_proj.weight"] = (FFN, H)
        shapes[p + "mlp.up_proj.weight"] = (FFN, H)
        shapes[p + "mlp.down_proj.weight"] = (H, FFN)
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
    shapes["model.norm.weight"] = (H,)
    shapes["lm_head.weight"] = (vocab, H)
    return shapes


def multimodal_shapes() -> dict[str, tuple[int, ...]]:
    c = 4  # the CLIP width (1024 in the real model)
    shapes = {}
    for name in RELEASED_MULTIMODAL_NAMES:
        if name.startswith("model.mm_projector."):
            shape = (H, c) if name.endswith("weight") else (H,)
        elif ".diff_projector_list." in name:
            shape = (c + 2, c + 2) if name.endswith("weight") else (c + 2,)
        elif ".net.0." in name:
            shape = (c, 2 * (c + 2), 1) if name.endswith("weight") else (c,)
        elif ".norm." in name:
            shape = (c,)
        elif ".flatten_projector." in name:
            shape = (c, c * 3) if name.endswith("weight") else (c,)
        else:  # dim_projector
            shape = (H, c) if name.endswith("weight") else (H,)
        shapes[name] = shape
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int, dtype=torch.float16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=g) * 0.05).to(dtype) for name, shape in shapes.items()}


def write_checkpoint(folder: Path, state: dict[str, torch.Tensor], fmt: str = "safetensors", shards: int = 1) -> Path:
    """Write `state` the way transformers would: one file, or `shards` files plus an index."""
    folder.mkdir(parents=True)
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file_name = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i:05d}-of-{shards:05d}.{ext}"
        part = {n: state[n] for n in group}
        if fmt == "safetensors":
            save_file(part, str(folder / file_name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / file_name)
        weight_map.update({n: file_name for n in group})
    if shards > 1:
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name, text in SIDE.items():
        (folder / name).write_text(text)
    return folder


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return dict(reader.iter_tensors())


@pytest.fixture(scope="module")
def models() -> dict[str, dict[str, torch.Tensor]]:
    """base (Vicuna-like, 32000 rows), delta (32001 rows + 18 absolute multimodal tensors), expected target."""
    base = random_state(llama_shapes(VOCAB), seed=0)
    delta = random_state({**llama_shapes(VOCAB + 1), **multimodal_shapes()}, seed=1)
    target = {}
    for name, d in delta.items():
        if name in RELEASED_MULTIMODAL_NAMES:
            target[name] = d.clone()
        elif d.shape == base[name].shape:
            target[name] = (d.float() + base[name].float()).half()
        else:
            t = d.float()
            t[:VOCAB, :H] += base[name].float()
            target[name] = t.half()
    return {"base": base, "delta": delta, "target": target}


def assert_state_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert torch.equal(actual[name], value), name


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.mark.parametrize(
    ("base_fmt", "base_shards", "delta_fmt", "delta_shards"),
    [("bin", 2, "safetensors", 3), ("safetensors", 1, "bin", 1), ("bin", 1, "bin", 2)],
)
def test_apply_delta_rebuilds_target_bit_for_bit(tmp_path, models, base_fmt, base_shards, delta_fmt, delta_shards):
    base = write_checkpoint(tmp_path / "base", models["base"], base_fmt, base_shards)
    delta = write_checkpoint(tmp_path / "delta", models["delta"], delta_fmt, delta_shards)
    out = apply_delta(base, tmp_path / "target", delta, max_shard_size=300_000)

    assert_state_equal(read_all(out), models["target"])
    # The extra <region_fea> row and the multimodal tensors are the delta's, untouched.
    rebuilt = load_file(next(out.glob("*.safetensors")))  # any one shard loads with the reference library
    assert rebuilt
    index = json.loads((out / SAFETENSORS_INDEX_NAME).read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) >= 2 and shard_files == sorted(p.name for p in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in models["target"].values())
    with safe_open(out / shard_files[0], framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    for name, text in SIDE.items():
        assert (out / name).read_text() == text
    assert leftovers(tmp_path, "target") == [out]


def test_cli_accepts_the_readme_prefixes(tmp_path, models):
    base = write_checkpoint(tmp_path / "base", models["base"])
    delta = write_checkpoint(tmp_path / "delta", models["delta"])
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text('{"model_type": "clip_vision_model"}')
    rc = apply_delta_module.main(
        ["--base", str(base), "--target", str(tmp_path / "t"), "--delta", str(delta), "--vision-tower-path", str(clip)]
    )
    assert rc == 0
    assert_state_equal(read_all(tmp_path / "t"), models["target"])
    assert (tmp_path / "t" / "model.safetensors").is_file()  # 1.1 MB fits one 5GB shard: no index
    assert not (tmp_path / "t" / SAFETENSORS_INDEX_NAME).exists()
    assert (tmp_path / "t" / "vision_tower" / "config.json").is_file()


def test_make_delta_then_apply_delta_round_trips(tmp_path, models):
    base = write_checkpoint(tmp_path / "base", models["base"], "bin", 2)
    target = write_checkpoint(tmp_path / "target", models["target"], "safetensors", 2)

    delta32 = make_delta(base, target, tmp_path / "delta32", dtype="float32", max_shard_size="100KB")
    d = read_all(delta32)
    emb = models["target"]["model.embed_tokens.weight"]
    assert d["model.embed_tokens.weight"].dtype == torch.float32
    assert torch.equal(d["model.embed_tokens.weight"][VOCAB], emb[VOCAB].float())  # the extra row stays absolute
    for name in RELEASED_MULTIMODAL_NAMES:
        assert torch.equal(d[name], models["target"][name].float()), name
    rebuilt = apply_delta(base, tmp_path / "rebuilt32", delta32, dtype="float16")
    assert_state_equal(read_all(rebuilt), models["target"])
    assert json.loads((rebuilt / "config.json").read_text())["torch_dtype"] == "float16"

    # A float16 delta (the default: the target's dtype) round-trips to within float16 rounding.
    delta16 = make_delta(base, target, tmp_path / "delta16")
    assert all(t.dtype == torch.float16 for t in read_all(delta16).values())
    rebuilt16 = apply_delta(base, tmp_path / "rebuilt16", delta16)
    comparison = compare_checkpoints(target, rebuilt16, atol=1e-3, rtol=0)
    assert comparison.equal, comparison.report()


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("model.layers.1.mlp.up_proj.weight", (FFN, H + 1), "model.layers.1.mlp.up_proj.weight has shape [12, 9]"),
        ("model.embed_tokens.weight", (VOCAB + 1, H + 1), "[32001, 9] in the delta"),
        ("lm_head.weight", (VOCAB - 1, H), "[31999, 8] in the delta"),
        ("model.resampler.weight", (H, H), "model.resampler.weight [8, 8] of the delta is not in the base"),
    ],
)
def test_mismatched_delta_is_refused_and_writes_nothing(tmp_path, models, name, shape, message):
    bad = dict(models["delta"])
    bad[name] = torch.zeros(shape, dtype=torch.float16)
    base = write_checkpoint(tmp_path / "base", models["base"])
    delta = write_checkpoint(tmp_path / "delta", bad, "bin", 2)
    with pytest.raises(DeltaError) as err:
        apply_delta(base, tmp_path / "target", delta)
    assert message in str(err.value)
    if name in models["base"]:
        assert f"{list(models['base'][name].shape)} in the base" in str(err.value)
    assert leftovers(tmp_path, "target") == []
    argv = ["--base", str(base), "--target", str(tmp_path / "target"), "--delta", str(delta)]
    assert apply_delta_module.main(argv) == 1
    assert leftovers(tmp_path, "target") == []


@pytest.mark.parametrize("failure", ["error", "ctrl-c", "sigterm"])
def test_interrupted_write_leaves_nothing(tmp_path, models, monkeypatch, failure):
    base = write_checkpoint(tmp_path / "base", models["base"])
    delta = write_checkpoint(tmp_path / "delta", models["delta"])
    real_write = ShardedSafetensorsWriter.write
    calls = []

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 10:  # by now several shards are complete on disk and one is half written
            if failure == "error":
                raise OSError("No space left on device")
            if failure == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        real_write(self, name, tensor)

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", failing_write)
    previous = signal.getsignal(signal.SIGTERM)
    exit_cleanly_on_sigterm()  # as the CLIs do
    try:
        with pytest.raises({"error": OSError, "ctrl-c": KeyboardInterrupt, "sigterm": SystemExit}[failure]):
            apply_delta(base, tmp_path / "target", delta, max_shard_size=50_000)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(calls) == 10
    assert leftovers(tmp_path, "target") == []


def test_reader_names_a_missing_shard(tmp_path, models):
    folder = write_checkpoint(tmp_path / "model", models["base"], "safetensors", 2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names the shard model-00002-of-00002.safetensors, which is missing"):
        CheckpointReader(folder)
    with pytest.raises(CheckpointError, match="no weights in"):
        CheckpointReader(tmp_path)


def test_existing_target_is_refused_unless_overwrite(tmp_path, models):
    base = write_checkpoint(tmp_path / "base", models["base"])
    delta = write_checkpoint(tmp_path / "delta", models["delta"])
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        apply_delta(base, target, delta)
    assert (target / "old.txt").read_text() == "old"
    with pytest.raises(FileExistsError, match="also an input"):
        apply_delta(base, delta, delta, overwrite=True)
    apply_delta(base, target, delta, overwrite=True)
    assert not (target / "old.txt").exists()
    assert_state_equal(read_all(target), models["target"])
    assert leftovers(tmp_path, "target") == [target]


def test_rotary_inv_freq_buffers_are_left_out(tmp_path, models):
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    base_state = {**models["base"], inv_freq: torch.ones(H // 2)}
    delta_state = {**models["delta"], inv_freq: torch.ones(H // 2)}
    base = write_checkpoint(tmp_path / "base", base_state)
    delta = write_checkpoint(tmp_path / "delta", delta_state)
    assert_state_equal(read_all(apply_delta(base, tmp_path / "t", delta)), models["target"])


def test_plan_counts_each_rule(tmp_path, models):
    base = CheckpointReader(write_checkpoint(tmp_path / "base", models["base"]))
    delta = CheckpointReader(write_checkpoint(tmp_path / "delta", models["delta"], "bin"))
    rules = [step.rule for step in plan_delta(delta, base)]
    assert (rules.count("absolute"), rules.count("top_rows"), rules.count("same_shape")) == (18, 2, 1 + 9 * LAYERS)


def test_verify_reports_equal_and_unequal(tmp_path, models, capsys):
    target = models["target"]
    a = write_checkpoint(tmp_path / "a", target, "bin", 2)
    b = write_checkpoint(tmp_path / "b", target, "safetensors", 3)
    assert verify_main(["--orig-model-path", str(a), "--new-model-path", str(b)]) == 0
    assert "EQUAL: 39 tensors compared, 0 differences" in capsys.readouterr().out

    changed = dict(target)
    changed["model.norm.weight"] = changed["model.norm.weight"] + 0.01
    del changed["model.mm_projector.bias"]
    c = write_checkpoint(tmp_path / "c", changed)
    assert verify_main(["--orig-model-path", str(a), "--new-model-path", str(c)]) == 1
    out = capsys.readouterr().out
    assert "model.norm.weight: values differ, max |difference| 0.01" in out
    assert "model.mm_projector.bias: only in the original" in out
    assert "DIFFERENT: 38 tensors compared, 2 differences" in out
    assert compare_checkpoints(a, c, atol=0.02).value_mismatch == []

    # Exactly equal with zero tolerance; a float32 copy of float16 values is still equal.
    d = write_checkpoint(tmp_path / "d", {n: t.float() for n, t in target.items()})
    assert compare_checkpoints(a, d, atol=0, rtol=0).equal


def test_extract_writes_only_matching_keys(tmp_path, models):
    model = write_checkpoint(tmp_path / "model", models["target"], "bin", 2)
    out = tmp_path / "extracted_mm_projector.bin"
    rc = extract_main(["--model-path", str(model), "--output", str(out), "--keys_to_match", "mm_projector"])
    assert rc == 0
    saved = torch.load(out, weights_only=True)
    assert sorted(saved) == ["model.mm_projector.bias", "model.mm_projector.weight"]
    assert torch.equal(saved["model.mm_projector.weight"], models["target"]["model.mm_projector.weight"])

    both = extract(model, tmp_path / "mm.safetensors", ["mm_projector", "region_geo_sampler"])
    assert sorted(load_file(tmp_path / "mm.safetensors")) == sorted(both) == sorted(RELEASED_MULTIMODAL_NAMES)
    assert extract_main(["--model-path", str(model), "--output", str(out), "--keys_to_match", "nothing"]) == 1
    assert sorted(torch.load(out, weights_only=True)) == sorted(saved)  # untouched by the failed run


def test_consolidate_bin_to_sharded_bf16(tmp_path, models):
    src = write_checkpoint(tmp_path / "src", {**models["target"], "model.step": torch.tensor(7)}, "bin", 2)
    dst = consolidate(src, tmp_path / "dst", dtype="bf16", max_shard_size="200KB")
    got = read_all(dst)
    assert got.pop("model.step").item() == 7  # non-float tensors keep their dtype
    assert_state_equal(got, {n: t.to(torch.bfloat16) for n, t in models["target"].items()})
    assert len(list(dst.glob("model-*-of-*.safetensors"))) >= 2
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_writer_plans_shards_and_checks_its_input(tmp_path):
    specs = [TensorSpec(f"t{i}", (n,), torch.float16) for i, n in enumerate([10, 20, 5, 100, 1])]
    assert [[s.name for s in shard] for shard in plan_shards(specs, 60)] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("100") == 100

    writer = ShardedSafetensorsWriter(tmp_path, specs[:2], max_shard_size=1000)
    with pytest.raises(ValueError, match="expected tensor t0 next, got t1"):
        writer.write("t1", torch.zeros(20, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"t0 is \[11\]"):
        writer.write("t0", torch.zeros(11, dtype=torch.float16))
    writer.write("t0", torch.arange(10, dtype=torch.float16))
    with pytest.raises(ValueError, match="1 planned tensors were never written, starting with t1"):
        writer.close()


def test_rebuilt_model_loads_with_the_core_loader_and_generates(tmp_path, model, processor):
    """A Ferret checkpoint -> delta against a LLaMA-only base (one row fewer) -> apply_delta -> load_pretrained_model."""
    from PIL import Image

    from ferret.model.builder import load_pretrained_model
    from ferret.regions import Box

    target = tmp_path / "target"
    model.save_pretrained(target, save_vision_tower=True)
    processor.save_pretrained(target)
    base_state = {k: v.clone() for k, v in model.state_dict().items()
                  if "mm_projector" not in k and "region_geo_sampler" not in k}
    base_state["model.embed_tokens.weight"] = base_state["model.embed_tokens.weight"][:-1] * 0.5
    base_state["lm_head.weight"] = base_state["lm_head.weight"][:-1] - 0.25
    write_checkpoint(tmp_path / "base", {k: v.contiguous() for k, v in base_state.items()})
    make_delta(tmp_path / "base", target, tmp_path / "delta", dtype="float32")
    apply_delta(tmp_path / "base", tmp_path / "rebuilt", tmp_path / "delta", vision_tower_path=target / "vision_tower")

    rebuilt, rebuilt_processor = load_pretrained_model(str(tmp_path / "rebuilt"), device="cpu")
    for name, tensor in model.state_dict().items():
        # (target - base) + base is exact up to one float32 rounding step.
        assert torch.allclose(rebuilt.state_dict()[name], tensor, rtol=0, atol=1e-6), name
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    batch = rebuilt_processor(image, "What is <region0>?", regions=[[Box(4, 4, 40, 30)]])
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    expected = model.generate(**processor.model_inputs(batch, model), **kwargs)
    assert torch.equal(rebuilt.generate(**rebuilt_processor.model_inputs(batch, rebuilt), **kwargs), expected)


def test_leftovers_of_killed_runs_are_named_with_what_to_do(tmp_path, models, caplog):
    """A run killed inside atomic_output_dir leaves `.NAME.partial-*` (unfinished output) and, when it was
    replacing a target, `.NAME.old-*` (the previous target); the next run names each and says what to do."""
    base = write_checkpoint(tmp_path / "base", models["base"])
    delta = write_checkpoint(tmp_path / "delta", models["delta"])
    partial = tmp_path / ".target.partial-4242-0123abcd"
    old = tmp_path / ".target.old-89abcdef"
    for folder in (partial, old):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"torn")
    with caplog.at_level("WARNING"):
        apply_delta(base, tmp_path / "target", delta)
    assert f"{partial} is the unfinished output of an earlier killed run; safe to delete" in caplog.text
    # when the run was killed between moving the old target aside and renaming the new one in, the old one is
    # the only copy: the message says how to restore it
    assert f"{old} is the previous {tmp_path / 'target'}, moved aside by a run killed while replacing it: " \
           f"`mv {old} {tmp_path / 'target'}` restores it" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        apply_delta(base, tmp_path / "target", delta, overwrite=True)
    assert f"{old} is a previous {tmp_path / 'target'} kept aside by an earlier killed run" in caplog.text
    assert_state_equal(read_all(tmp_path / "target"), models["target"])
