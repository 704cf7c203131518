"""The posterior as an artifact: posterior.safetensors, Posterior, the model card, push_to_hub."""

import os
import pickle
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_ivonpc import PCTrainer, PCTrainingArguments, Posterior
from hf_ivonpc.posterior import POSTERIOR_INDEX_NAME, POSTERIOR_NAME, layer_type

from _tiny_lm import VOCAB, CharWindows, tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]


def _args(out, method="ivon", **over):
    kw = dict(output_dir=str(out), pc_method=method, max_steps=3, learning_rate=0.05,
              per_device_train_batch_size=4, report_to=[], save_strategy="no", ivon_hess_init=0.1,
              ivon_ess=1e4, pc_megabatch_factor=2, pc_refresh_steps=1, pc_start_step=1,
              logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0)
    if method in ("none", "alpha_svrg"):
        kw["learning_rate"] = 3e-3
    kw.update(over)
    return PCTrainingArguments(**kw)


def _batch(n=4):
    return {"input_ids": torch.stack([CharWindows("val")[i]["input_ids"] for i in range(n)])}


def _toy_posterior(model, ess=100.0, wd=1e-3, seed=0, momentum=False):
    """A posterior over every parameter of ``model`` with random h (no training needed)."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _ in model.named_parameters()]
    hess = {n: torch.rand(p.shape, generator=g) + 0.1 for n, p in model.named_parameters()}
    mom = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()} if momentum else None
    std = {n: h.add(wd).mul(ess).rsqrt() for n, h in hess.items()}
    return Posterior(std, hess, [{"params": names, "ess": ess, "weight_decay": wd}], momentum=mom,
                     method="ivon", step=0)


def _save_v1(post, folder):
    """``posterior.safetensors`` as format version 1 wrote it: std (sigma), hess and momentum."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for kind, table in (("std", post.std), ("hess", post.hess), ("momentum", post.momentum)):
        for n in post.names if table else ():
            tensors[f"{kind}.{n}"] = table[n].contiguous()
    save_file(tensors, folder / POSTERIOR_NAME, metadata={**post.metadata(), "hf_ivonpc.posterior": "1"})
    return folder / POSTERIOR_NAME


# ---------------------------------------------------------------------------- round trip
ROUND_TRIP = """
import runpy, sys, torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel
from hf_ivonpc import Posterior
out, batch_file, result = sys.argv[1:4]
model = GPT2LMHeadModel.from_pretrained(out)
post = Posterior.from_pretrained(out, model=model)
from safetensors.torch import load_file
batch = load_file(batch_file)
probs = post.predictive(model, batch, n_samples=3, seed=7)
save_file({"probs": probs, **{"std." + n: s for n, s in post.std.items()}}, result)
sys.argv = ["python -m hf_ivonpc", "posterior", "info", out]     # the command line, as with -m
runpy.run_module("hf_ivonpc", run_name="__main__")
"""


def test_round_trip_in_a_fresh_process(tmp_path):
    out = tmp_path / "out"
    trainer = PCTrainer(model=tiny_gpt2(), args=_args(out, save_strategy="steps", save_steps=2),
                        train_dataset=CharWindows())
    trainer.train()
    trainer.save_model()
    # every checkpoint holds its own posterior, with its step
    assert Posterior.from_pretrained(out / "checkpoint-2").step == 2
    opt = trainer.pc_optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    expected_std = {names[id(p)]: s for p, s in zip([p for g in opt.param_groups for p in g["params"]],
                                                    opt.posterior_std())}
    batch = _batch()
    expected = trainer.posterior().predictive(trainer.model, batch, n_samples=3, seed=7)
    save_file(batch, tmp_path / "batch.safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(out), str(tmp_path / "batch.safetensors"),
                          str(tmp_path / "result.safetensors")], env=env, timeout=120,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = load_file(tmp_path / "result.safetensors")
    assert {k[4:] for k in got if k.startswith("std.")} == set(expected_std)
    for n, s in expected_std.items():
        assert torch.equal(got["std." + n], s), n
    assert torch.equal(got["probs"], expected)
    # the draws are real: the predictive differs from the mean's probabilities
    with torch.no_grad():
        trainer.model.eval()
        at_mean = trainer.model(**batch).logits.softmax(-1)
    assert not torch.allclose(at_mean, expected, atol=1e-6)

    # `hf-ivonpc posterior info` printed the summary
    assert "method: ivon   step: 3" in run.stdout
    for kind in ("embeddings", "attention", "mlp", "norm"):
        assert f"| {kind} |" in run.stdout


# ---------------------------------------------------------------------------- sampling
def test_sample_draws_and_restores_exact_weights():
    model = tiny_gpt2()
    post = _toy_posterior(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with post.sample(model, seed=3):
        z = torch.cat([((p - before[n]) / post.std[n]).flatten() for n, p in model.named_parameters()])
        first = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05     # theta = m + sigma eps
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with post.sample(model, seed=3):                                          # same seed, same draw
        assert all(torch.equal(p, first[n]) for n, p in model.named_parameters())
    with post.sample(model, seed=4):
        assert not torch.equal(model.transformer.wte.weight, first["transformer.wte.weight"])
    with pytest.raises(RuntimeError, match="inside"):
        with post.sample(model, seed=3):
            raise RuntimeError("inside the block")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_layer_types_from_parameter_names():
    assert layer_type("transformer.wte.weight") == "embeddings"
    assert layer_type("bert.embeddings.LayerNorm.weight") == "norm"
    assert layer_type("transformer.h.0.attn.c_attn.weight") == "attention"
    assert layer_type("bert.encoder.layer.0.attention.output.dense.weight") == "attention"
    assert layer_type("bert.encoder.layer.0.output.dense.weight") == "mlp"
    assert layer_type("model.layers.0.mlp.gate_proj.weight") == "mlp"
    assert layer_type("classifier.weight") == "head"
    assert layer_type("base_model.model.transformer.h.1.attn.c_attn.lora_B.default.weight") == "attention"


def test_load_into_optimizer_continues_from_a_saved_posterior(tmp_path):
    from hf_ivonpc.optim import IVON
    model = tiny_gpt2()
    post = _toy_posterior(model)
    post.save(tmp_path)
    opt = IVON(model.parameters(), lr=0.1, ess=100.0, hess_init=1.0, weight_decay=1e-3)
    Posterior.from_pretrained(tmp_path, model=model).load_into_optimizer(opt, model)
    for s, n in zip(opt.posterior_std(), post.names):
        assert torch.allclose(s, post.std[n])


# ---------------------------------------------------------------------------- bad files
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_corrupt_or_mismatched_files_are_refused(tmp_path):
    model = tiny_gpt2()
    good = tmp_path / "good"
    _toy_posterior(model).save(good)
    meta, tensors = _header(good / POSTERIOR_NAME), load_file(good / POSTERIOR_NAME)

    def variant(name, tensors=tensors, meta=meta, raw=None):
        d = tmp_path / name
        d.mkdir()
        if raw is not None:
            (d / POSTERIOR_NAME).write_bytes(raw)
        else:
            save_file(tensors, d / POSTERIOR_NAME, metadata=meta)
        return d

    data = (good / POSTERIOR_NAME).read_bytes()
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        Posterior.from_pretrained(variant("truncated", raw=data[:-100]))
    marker = tmp_path / "pwned"
    for i, raw in enumerate([pickle.dumps(_Evil(marker)), _torch_save_bytes(_Evil(marker), tmp_path)]):
        with pytest.raises(ValueError, match="not a valid safetensors file.*nothing is unpickled"):
            Posterior.from_pretrained(variant(f"pickle{i}", raw=raw))
    assert not marker.exists()
    missing = {k: v for k, v in tensors.items() if k != "hess.transformer.h.0.ln_1.weight"}
    with pytest.raises(ValueError, match="have no 'hess' tensor.*transformer.h.0.ln_1.weight"):
        Posterior.from_pretrained(variant("missing", tensors=missing))
    as_int = {**tensors, "hess.transformer.wpe.weight": torch.ones(32, 32, dtype=torch.int32)}
    with pytest.raises(ValueError, match="dtype torch.int32: expected a floating point"):
        Posterior.from_pretrained(variant("dtype", tensors=as_int))
    for bad in (float("nan"), float("inf"), -1.0):   # from a diverged run: no posterior (h + weight_decay <= 0)
        hess = tensors["hess.transformer.wpe.weight"].clone()
        hess[3, 5] = bad
        with pytest.raises(ValueError, match="'hess.transformer.wpe.weight' holds non-finite or non-positive"):
            Posterior.from_pretrained(variant(f"hess{bad}", tensors={**tensors, "hess.transformer.wpe.weight": hess}))
    # format version 1 stored sigma beside h: it must have h's shape and equal sigma(h)
    v1 = tmp_path / "v1"
    meta1, tensors1 = _header(_save_v1(_toy_posterior(model), v1)), load_file(v1 / POSTERIOR_NAME)
    reshaped = {**tensors1, "std.transformer.wpe.weight": tensors1["std.transformer.wpe.weight"][:3].contiguous()}
    with pytest.raises(ValueError, match="transformer.wpe.weight' has shape"):
        Posterior.from_pretrained(variant("shape", tensors=reshaped, meta=meta1))
    wrong_sigma = {**tensors1, "std.transformer.wpe.weight": tensors1["std.transformer.wpe.weight"] * 2}
    with pytest.raises(ValueError, match="is not 1 / sqrt"):
        Posterior.from_pretrained(variant("sigma", tensors=wrong_sigma, meta=meta1))
    with pytest.raises(ValueError, match="have no 'std' tensor"):      # version 1 without sigma
        Posterior.from_pretrained(variant("v1_no_std", tensors=tensors, meta={**meta, "hf_ivonpc.posterior": "1"}))
    no_format = {k: v for k, v in meta.items() if k != "hf_ivonpc.posterior"}
    with pytest.raises(ValueError, match="not a posterior"):
        Posterior.from_pretrained(variant("format", meta=no_format))
    with pytest.raises(ValueError, match="'groups' is not valid JSON"):
        Posterior.from_pretrained(variant("json", meta={**meta, "groups": "[{"}))
    with pytest.raises(ValueError, match="newer"):
        Posterior.from_pretrained(variant("newer", meta={**meta, "hf_ivonpc.posterior": "99"}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no posterior.safetensors"):
        Posterior.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither a local file or folder nor a Hub"):
        Posterior.from_pretrained(str(tmp_path / "nowhere"))

    # against a model: other shapes, other names; nothing changes before the error
    other = tiny_gpt2()
    other.resize_token_embeddings(50)
    with pytest.raises(ValueError, match=r"'transformer.wte.weight' has shape \(50, 32\), the posterior"):
        Posterior.from_pretrained(good, model=other)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    post = Posterior.from_pretrained(good)
    with pytest.raises(ValueError, match="has shape"):
        with post.sample(other, seed=0):
            pass
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    with pytest.raises(ValueError, match="are not in model.named_parameters"):
        post.check(torch.nn.Linear(3, 3))


def _header(file):
    from safetensors import safe_open
    with safe_open(str(file), "pt") as f:
        return f.metadata()


def _torch_save_bytes(obj, tmp_path):
    f = tmp_path / "evil.pt"
    torch.save(obj, f)
    return f.read_bytes()


def test_a_crash_while_saving_leaves_the_previous_file(tmp_path, monkeypatch):
    import safetensors.torch
    model = tiny_gpt2()
    _toy_posterior(model, seed=0).save(tmp_path)
    before = (tmp_path / POSTERIOR_NAME).read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt("killed while saving")
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _toy_posterior(model, seed=1).save(tmp_path)
    assert (tmp_path / POSTERIOR_NAME).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [POSTERIOR_NAME]        # no temp file left either


# ---------------------------------------------------------------------------- layouts
def _equal(a, b):
    assert a.names == b.names
    for kind in ("std", "hess", "momentum"):
        ta, tb = getattr(a, kind), getattr(b, kind)
        assert set(ta) == set(tb), kind
        for n in ta:
            assert torch.equal(ta[n], tb[n]), (kind, n)


def test_new_files_hold_no_sigma_and_sigma_is_recomputed_exactly(tmp_path):
    from hf_ivonpc.optim import IVON
    model = tiny_gpt2()
    opt = IVON(model.parameters(), lr=0.1, ess=100.0, hess_init=0.5, weight_decay=1e-3)
    with torch.no_grad():
        for p in model.parameters():
            opt.state[p]["hess"].uniform_(0.01, 3.0)
    post = Posterior.from_optimizer(opt, model)
    file = post.save(tmp_path)
    keys = set(load_file(file))
    assert keys == {f"{k}.{n}" for k in ("hess", "momentum") for n in post.names}   # no std.*
    assert _header(file)["hf_ivonpc.posterior"] == "2"
    loaded = Posterior.from_pretrained(tmp_path, model=model)
    _equal(loaded, post)                 # sigma bit for bit the optimizer's (torch.equal)
    for s, n in zip(opt.posterior_std(), post.names):
        assert torch.equal(loaded.std[n], s), n


def test_the_old_layout_with_sigma_still_loads(tmp_path):
    model = tiny_gpt2()
    post = _toy_posterior(model, momentum=True)
    file = _save_v1(post, tmp_path / "old")
    assert any(k.startswith("std.") for k in load_file(file))
    loaded = Posterior.from_pretrained(tmp_path / "old", model=model)
    _equal(loaded, post)
    assert loaded.step == 0 and loaded.method == "ivon"
    from hf_ivonpc.tasks import continual
    assert continual.posterior_file(str(tmp_path / "old")) == str(file)


def test_sharded_save_round_trips_and_equals_the_single_file(tmp_path, capsys):
    model = tiny_gpt2()
    post = _toy_posterior(model, momentum=True)
    single = Path(post.save(tmp_path / "one"))
    assert single.name == POSTERIOR_NAME and sorted(os.listdir(tmp_path / "one")) == [POSTERIOR_NAME]
    index_file = Path(post.save_pretrained(tmp_path / "many", max_shard_size="40KB"))
    assert index_file.name == POSTERIOR_INDEX_NAME
    import json
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n >= 4
    assert shards == [f"posterior-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(tmp_path / "many")) == sorted([POSTERIOR_INDEX_NAME, *shards])
    assert set(index["weight_map"]) == set(load_file(single))
    assert not [k for k in index["weight_map"] if k.startswith("std.")]
    total = 0
    for shard in shards:
        tensors = load_file(tmp_path / "many" / shard)
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(tensors)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 40_000 or len(tensors) == 1
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        # every shard's header carries the metadata (format version, method, groups, step, ...)
        assert _header(tmp_path / "many" / shard) == _header(single)
    assert index["metadata"] == {**_header(single), "total_size": total}
    # loads from the folder and from the index file itself, equal to the single file's posterior
    one = Posterior.from_pretrained(tmp_path / "one", model=model)
    for where in (tmp_path / "many", index_file):
        many = Posterior.from_pretrained(where, model=model)
        _equal(many, one)
        _equal(many, post)
        assert many.step == 0 and many.groups == one.groups
    from hf_ivonpc.tasks import continual
    from hf_ivonpc.tasks.posterior import main
    assert continual.posterior_file(str(tmp_path / "many")) == str(index_file)
    assert main(["info", str(tmp_path / "many")]) in (0, None)
    assert "method: ivon   step: 0" in capsys.readouterr().out
    # an int of bytes; then fewer shards replace more, then one file replaces the shards
    post.save(tmp_path / "many", max_shard_size=125_000)
    left = sorted(os.listdir(tmp_path / "many"))
    assert POSTERIOR_INDEX_NAME in left and len(left) == 3 and "-00002-of-00002" in left[1]
    _equal(Posterior.from_pretrained(tmp_path / "many"), post)
    post.save(tmp_path / "many")
    assert sorted(os.listdir(tmp_path / "many")) == [POSTERIOR_NAME]
    for bad in ("5 parsecs", 0, -1, True):
        with pytest.raises(ValueError, match="max_shard_size"):
            post.save(tmp_path / "bad", max_shard_size=bad)


def test_a_shard_of_another_save_or_a_missing_shard_is_refused(tmp_path):
    import shutil
    model = tiny_gpt2()
    _toy_posterior(model, seed=0).save(tmp_path / "a", max_shard_size="40KB")
    post1 = _toy_posterior(model, seed=1)
    post1.step = 5
    post1.save(tmp_path / "b", max_shard_size="40KB")
    shard = sorted(os.listdir(tmp_path / "b"))[0]
    assert shard.startswith("posterior-00001-of-") and set(os.listdir(tmp_path / "b")) == set(os.listdir(tmp_path / "a"))
    shutil.copyfile(tmp_path / "b" / shard, tmp_path / "a" / shard)
    with pytest.raises(ValueError, match="belongs to another save"):
        Posterior.from_pretrained(tmp_path / "a")
    os.remove(tmp_path / "a" / shard)
    with pytest.raises(ValueError, match="missing"):
        Posterior.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize("previous", ["single", "same_shards", "other_shards"])
def test_a_sharded_save_interrupted_after_some_shards_leaves_the_previous_posterior(tmp_path, monkeypatch, previous):
    import safetensors.torch
    model = tiny_gpt2()
    old = _toy_posterior(model, seed=0, momentum=True)
    old.save(tmp_path, max_shard_size={"single": "5GB", "same_shards": "40KB", "other_shards": "100KB"}[previous])
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    real, calls = safetensors.torch.save_file, []

    def crash_on_the_third(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            Path(filename).write_bytes(b"half a shard")
            raise KeyboardInterrupt("killed while saving")
        real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _toy_posterior(model, seed=1, momentum=True).save(tmp_path, max_shard_size="40KB")
    assert len(calls) == 3
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before   # no temp file left
    _equal(Posterior.from_pretrained(tmp_path, model=model), old)


def test_the_hub_serves_a_sharded_posterior(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError
    model = tiny_gpt2()
    post = _toy_posterior(model, momentum=True)
    post.save(tmp_path / "repo", max_shard_size="40KB")
    asked = []

    def download(repo_id, filename, subfolder=None, **kw):
        asked.append(filename)
        if not (tmp_path / "repo" / filename).is_file():
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(tmp_path / "repo" / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    _equal(Posterior.from_pretrained("org/sharded", model=model), post)
    assert asked[:2] == [POSTERIOR_NAME, POSTERIOR_INDEX_NAME] and len(asked) > 3
    from hf_ivonpc.tasks import continual
    assert continual.posterior_file("org/sharded") == str(tmp_path / "repo" / POSTERIOR_INDEX_NAME)


def test_push_to_hub_uploads_the_shards_and_the_index(tmp_path, monkeypatch):
    import hf_ivonpc.posterior
    monkeypatch.setattr(hf_ivonpc.posterior, "DEFAULT_MAX_SHARD_SIZE", "40KB")
    hub = _FakeHub()
    trainer = _hub_trainer(tmp_path, monkeypatch, hub, "ivon", max_steps=3)
    trainer.train()
    trainer.push_to_hub()
    root_push, ckpt_push = hub.uploads[:2]       # the checkpoint's shards copied to output_dir
    path, final, contents = hub.uploads[-1]
    for files in (root_push[1], ckpt_push[1], final):
        shards = [f for f in files if f.startswith("posterior-")]
        assert POSTERIOR_INDEX_NAME in files and POSTERIOR_NAME not in files and len(shards) >= 3
    post = Posterior.from_pretrained(tmp_path, model=trainer.model)
    assert post.step == 3
    assert contents[POSTERIOR_INDEX_NAME] == (tmp_path / POSTERIOR_INDEX_NAME).read_bytes()
    assert "| attention |" in contents["README.md"].decode()


# ---------------------------------------------------------------------------- LoRA
def test_a_lora_adapter_carries_its_posterior(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    model = get_peft_model(tiny_gpt2(dropout=0.0), config)
    trainer = PCTrainer(model=model, args=_args(tmp_path), train_dataset=CharWindows())
    trainer.train()
    trainer.save_model()
    assert {"adapter_model.safetensors", POSTERIOR_NAME} <= set(os.listdir(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_gpt2(dropout=0.0), tmp_path)
    post = Posterior.from_pretrained(tmp_path, model=loaded)
    assert len(post.names) == 4 and all(".lora_" in n for n in post.names)
    before = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    with post.sample(loaded, seed=0):
        changed = {n for n, p in loaded.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(post.names)                       # only the adapters are drawn
    with pytest.raises(ValueError, match="PeftModel's"):
        post.check(tiny_gpt2())                             # the bare base model has other names


# ---------------------------------------------------------------------------- Hub and card
class _FakeHub:
    """Stands in for huggingface_hub.HfApi: records what upload_folder would upload."""

    def __init__(self, fail=False):
        self.fail, self.uploads = fail, []

    def create_repo(self, repo_id, **kwargs):
        from types import SimpleNamespace
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, folder_path, ignore_patterns=None, path_in_repo=None, run_as_future=False, **kw):
        from huggingface_hub.utils import filter_repo_objects
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS
        if self.fail:
            raise ConnectionError("the Hub is unreachable")
        root = Path(folder_path)
        files = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
        kept = set(filter_repo_objects(files, ignore_patterns=list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS))
        self.uploads.append((path_in_repo or "", kept, {f: (root / f).read_bytes() for f in kept}))
        if run_as_future:
            done = Future()
            done.set_result(None)
            return done
        return None


def _hub_trainer(tmp_path, monkeypatch, hub, method="ivon_pcm", **over):
    import transformers.trainer
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    kw = dict(push_to_hub=True, hub_model_id="someone/tiny-ivon-pcm", hub_strategy="checkpoint",
              save_strategy="steps", save_steps=2, pc_start_step=2)
    args = _args(tmp_path, method, **{**kw, **over})
    return PCTrainer(model=tiny_gpt2(), args=args, train_dataset=CharWindows(),
                     eval_dataset=CharWindows("val"))


def test_push_to_hub_uploads_model_posterior_and_card_together(tmp_path, monkeypatch):
    hub = _FakeHub()
    trainer = _hub_trainer(tmp_path, monkeypatch, hub)
    trainer.train()
    trainer.evaluate()
    trainer.push_to_hub()
    # during training (hub_strategy="checkpoint"): output_dir's files and the resumable checkpoint
    root_push, ckpt_push = [u for u in hub.uploads[:2]]
    assert ckpt_push[0] == "last-checkpoint"
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", POSTERIOR_NAME} <= ckpt_push[1]
    assert {"model.safetensors", POSTERIOR_NAME, "README.md"} <= root_push[1]
    # the end of training: everything of output_dir but _* and checkpoint-*
    path, final, contents = hub.uploads[-1]
    assert path == "" and {"config.json", "model.safetensors", POSTERIOR_NAME, "README.md"} <= final
    private = [f for f in final if f.startswith(("checkpoint-", "_")) or Path(f).name in
               ("optimizer.pt", "scheduler.pt", "trainer_state.json") or Path(f).name.startswith("rng_state")]
    assert private == []
    # the pushed posterior and weights belong together: the mean is the weights of the same step
    post = Posterior.from_pretrained(tmp_path, model=trainer.model)
    assert post.step == 3 and contents[POSTERIOR_NAME] == (tmp_path / POSTERIOR_NAME).read_bytes()

    card = contents["README.md"].decode()
    from huggingface_hub import ModelCard
    data = ModelCard(card).data
    assert data.library_name == "transformers" and "hf_ivonpc" in data.tags
    assert "IVON-PCM" in card and "SVRG and Beyond via Posterior Correction" in card
    for name in ("pc_alpha", "pc_rho1", "pc_rho2", "pc_megabatch_factor", "pc_refresh_steps",
                 "pc_start_step", "pc_mean_term_weight", "pc_shared_noise", "ivon_ess", "ivon_hess_init",
                 "ivon_beta1", "ivon_beta2", "ivon_clip_radius", "learning_rate", "weight_decay"):
        assert f"| {name} |" in card, name
    assert "adamw" not in card.lower()                   # not Trainer's args.optim
    assert "| eval_loss" in card and "| attention |" in card
    # the card's snippet runs as written (the repo id pointed at the local folder)
    snippet = card.split("```python\n")[1].split("```")[0]
    snippet = snippet.replace('"someone/tiny-ivon-pcm"', repr(str(tmp_path)))
    snippet = snippet.replace("inputs = ...", "inputs = BATCH")
    scope = {"BATCH": _batch(2)}
    exec(snippet, scope)
    assert scope["probs"].shape == (2, 32, len(VOCAB))


def test_a_failed_upload_loses_nothing_local(tmp_path, monkeypatch):
    import transformers.trainer
    trainer = _hub_trainer(tmp_path, monkeypatch, _FakeHub(), "ivon", save_strategy="no", max_steps=1)
    trainer.train()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: _FakeHub(fail=True))
    with pytest.raises(ConnectionError):
        trainer.push_to_hub()
    Posterior.from_pretrained(tmp_path, model=type(trainer.model).from_pretrained(tmp_path))
    assert "**IVON**" in (tmp_path / "README.md").read_text()
    assert not [f for f in os.listdir(tmp_path) if f.startswith("_tmp")]


def test_pushed_files_hold_no_hub_token(tmp_path, monkeypatch):
    hub = _FakeHub()
    trainer = _hub_trainer(tmp_path, monkeypatch, hub, save_strategy="no", hub_token="hf_NotARealToken123")
    trainer.push_to_hub()
    assert not [f for f, b in hub.uploads[-1][2].items() if b"hf_NotARealToken123" in b]


@pytest.mark.parametrize("method", ["alpha_svrg", "none"])
def test_methods_without_a_posterior_write_none_and_the_card_says_what_was_used(tmp_path, method):
    (tmp_path / POSTERIOR_NAME).write_bytes(b"a stale file of an earlier run")
    trainer = PCTrainer(model=tiny_gpt2(), args=_args(tmp_path, method, max_steps=1, pc_start_step=0),
                        train_dataset=CharWindows())
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    assert POSTERIOR_NAME not in os.listdir(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "no `posterior.safetensors`" in card and "| optim | adamw_torch" in card
    assert ("alpha-SVRG" in card) == ("| base optimizer | AdamW |" in card) == (method == "alpha_svrg")
    assert "Posterior.from_pretrained" not in card


# ---------------------------------------------------------------------------- uncertainty
def test_predictive_uncertainty_is_meaningful(tmp_path):
    """A small MLP on scikit-learn's digits, trained with IVON: the posterior predictive is no
    worse calibrated than the mean, and more uncertain far from the training data."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from transformers import EvalPrediction

    from hf_ivonpc.metrics import classification_metrics
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)

    class Digits(torch.utils.data.Dataset):
        def __len__(self):
            return 1500

        def __getitem__(self, i):
            return {"pixels": x[i], "labels": y[i]}

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden, self.classifier = torch.nn.Linear(64, 64), torch.nn.Linear(64, 10)

        def forward(self, pixels, labels=None):
            logits = self.classifier(torch.relu(self.hidden(pixels)))
            return {"logits": logits} if labels is None else {"logits": logits, "loss": F.cross_entropy(logits, labels)}
    torch.manual_seed(0)
    model = MLP()
    args = _args(tmp_path, "ivon", max_steps=150, per_device_train_batch_size=32, learning_rate=0.5,
                 ivon_ess=1500.0, ivon_hess_init=0.5, ivon_beta2=0.99, ivon_clip_radius=float("inf"),
                 lr_scheduler_type="constant", logging_steps=1000)
    trainer = PCTrainer(model=model, args=args, train_dataset=Digits())
    trainer.train()
    post = trainer.posterior()
    model.eval()
    test_x, test_y = x[1500:], y[1500:]
    far = 3 * torch.rand(300, 64, generator=torch.Generator().manual_seed(1))

    def entropy(p):
        return -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()
    with torch.no_grad():
        mean_logits = model(test_x)["logits"]
        mean_train, mean_far = (model(v)["logits"].softmax(-1) for v in (x[:300], far))
    pred = post.predictive(model, {"pixels": test_x}, n_samples=32, seed=0)
    pred_train, pred_far = (post.predictive(model, {"pixels": v}, n_samples=32, seed=0) for v in (x[:300], far))
    at_mean = classification_metrics(EvalPrediction(mean_logits.numpy(), test_y.numpy()))
    predictive = classification_metrics(EvalPrediction(pred.log().numpy(), test_y.numpy()))
    print(f"\ndigits MLP, IVON 150 steps: accuracy mean {at_mean['accuracy']:.3f} predictive "
          f"{predictive['accuracy']:.3f}; ECE mean {at_mean['ece']:.4f} predictive {predictive['ece']:.4f}; "
          f"NLL mean {at_mean['nll']:.3f} predictive {predictive['nll']:.3f}; entropy train inputs "
          f"mean {entropy(mean_train):.3f} predictive {entropy(pred_train):.3f}, far inputs mean "
          f"{entropy(mean_far):.3f} predictive {entropy(pred_far):.3f}")
    assert at_mean["accuracy"] > 0.75
    assert predictive["ece"] <= at_mean["ece"]
    assert entropy(pred_far) > entropy(pred_train)
    # and the draws add more uncertainty far from the data than on it
    assert entropy(pred_far) - entropy(mean_far) > entropy(pred_train) - entropy(mean_train)


def test_after_load_best_model_at_end_the_saved_posterior_is_the_best_checkpoints(tmp_path):
    # greater_is_better=True makes the *highest* eval loss the best: an early checkpoint, so the
    # weights at the end are not the optimizer's last mean
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps",
                 eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                 greater_is_better=True, learning_rate=0.5, per_device_eval_batch_size=48)
    trainer = PCTrainer(model=tiny_gpt2(), args=args, train_dataset=CharWindows(),
                        eval_dataset=CharWindows("val"))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")
    trainer.save_model()
    assert (tmp_path / POSTERIOR_NAME).read_bytes() == (Path(best) / POSTERIOR_NAME).read_bytes()
    assert Posterior.from_pretrained(tmp_path, model=trainer.model).step == 2


def test_summary_says_how_far_h_moved_from_h0():
    """A posterior whose h is still h0 is its initialisation; the summary shows it."""
    from hf_ivonpc.optim import IVON
    model = tiny_gpt2()
    opt = IVON(model.parameters(), lr=0.1, ess=100.0, hess_init=0.5, weight_decay=1e-3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attn" in name:   # attention's h moved to 3 h0 (|h - h0| / h0 = 2), the rest did not
                opt.state[p]["hess"].fill_(1.5)
    rows = {r["layer_type"]: r for r in Posterior.from_optimizer(opt, model).summary()}
    assert rows["attention"]["h_moved_median"] == pytest.approx(2.0)
    assert rows["mlp"]["h_moved_median"] == 0.0 and rows["mlp"]["h_moved_p99"] == 0.0
    assert "| attention |" in Posterior.from_optimizer(opt, model).format_summary()
    assert all(r["above_prior_share"] == 0.0 for r in rows.values())


def test_summary_counts_the_entries_whose_sigma_exceeds_the_priors():
    """h < 0 (with h + weight_decay > 0) makes sigma wider than the prior's 1 / sqrt(ess wd)."""
    from hf_ivonpc.optim import IVON
    model = tiny_gpt2()
    wd, ess = 1e-2, 100.0
    opt = IVON(model.parameters(), lr=0.1, ess=ess, hess_init=0.5, weight_decay=wd)
    named = dict(model.named_parameters())
    wte = named["transformer.wte.weight"]
    with torch.no_grad():
        opt.state[wte]["hess"][:2].fill_(-0.5 * wd)   # two rows of the embedding
    post = Posterior.from_optimizer(opt, model)
    rows = {r["layer_type"]: r for r in post.summary()}
    expected = 2 * wte.shape[1] / rows["embeddings"]["elements"]
    assert rows["embeddings"]["above_prior_share"] == pytest.approx(expected)
    assert rows["embeddings"]["std_max"] > (ess * wd) ** -0.5     # wider than the prior indeed
    assert all(r["above_prior_share"] == 0.0 for k, r in rows.items() if k != "embeddings")
    assert f"{100 * expected:.2f}%" in post.format_summary()


def test_capped_at_prior_narrows_only_the_entries_wider_than_the_prior():
    """capped_at_prior: h -> max(h, 0) in groups with weight decay, so sigma is the prior's
    1 / sqrt(ess wd) exactly where h < 0 and unchanged elsewhere; a group without weight decay (flat
    prior) and the original posterior are left as they were."""
    from hf_ivonpc.optim import IVON
    model = tiny_gpt2()
    wd, ess = 1e-2, 100.0
    named = dict(model.named_parameters())
    wte = named["transformer.wte.weight"]
    others = [p for n, p in named.items() if n != "transformer.wte.weight"]
    opt = IVON([{"params": [wte]}, {"params": others, "weight_decay": 0.0}],
               lr=0.1, ess=ess, hess_init=0.5, weight_decay=wd)
    with torch.no_grad():
        opt.state[wte]["hess"][:2].fill_(-0.5 * wd)   # two rows wider than the prior
        opt.state[wte]["hess"][2].fill_(3.0)          # one row narrower
    post = Posterior.from_optimizer(opt, model)
    before = {n: t.clone() for n, t in post.std.items()}
    capped = post.capped_at_prior()
    prior = (ess * wd) ** -0.5
    s = capped.std["transformer.wte.weight"]
    torch.testing.assert_close(s[:2], torch.full_like(s[:2], prior), rtol=1e-6, atol=0)
    assert torch.equal(s[2:], before["transformer.wte.weight"][2:])
    assert s.max().item() <= prior * (1 + 1e-6)
    assert (capped.hess["transformer.wte.weight"] >= 0).all()
    assert all(torch.equal(capped.std[n], before[n]) for n in post.names if n != "transformer.wte.weight")
    assert all(torch.equal(post.std[n], before[n]) for n in post.names)   # the original is unchanged
    assert post.std["transformer.wte.weight"].max().item() > prior
    assert {r["layer_type"]: r["above_prior_share"] for r in capped.summary()}["embeddings"] == 0.0
    assert capped.metadata()["sigma_cap"] == "prior"
    mean = wte.detach().clone()
    noise = {}
    for name, q in (("saved", post), ("capped", capped)):   # the same eps: only sigma differs
        with q.sample(model, generator=torch.Generator().manual_seed(0)):
            noise[name] = wte.detach() - mean
        assert torch.equal(wte.detach(), mean)              # restored
    ratio = before["transformer.wte.weight"] / s             # sqrt(2) on the capped rows, 1 elsewhere
    torch.testing.assert_close(noise["saved"], noise["capped"] * ratio, rtol=1e-5, atol=1e-7)
    assert ratio[:2].min().item() > 1.4
