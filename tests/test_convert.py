"""The converter of the authors' published GPT-2 layout (pytorch_model.bin + optimizer_param_groups.pt)."""

import pickle
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_ivonpc import Posterior
from hf_ivonpc.convert import LINEAR_WEIGHTS, convert_authors_gpt2
from hf_ivonpc.tasks.posterior import main

ESS, WD = 1e3, 1e-3


def _authors_files(src: Path, config_json=True):
    """A tiny GPT-2 trained a few steps with ivon-opt, saved as the authors did: the state dict,
    and param_groups without 'params' (nanoGPT's groups: >= 2-D tensors decayed, then the others)."""
    import ivon
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    named = [(n, p) for n, p in model.named_parameters()]
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": WD},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    opt = ivon.IVON(groups, lr=0.1, ess=ESS, hess_init=0.1, beta2=0.99, clip_radius=1e-2)
    for _ in range(3):
        ids = torch.randint(0, 40, (4, 16))
        with opt.sampled_params(train=True):
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    src.mkdir()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    torch.save([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
               src / "optimizer_param_groups.pt")
    if config_json:
        model.config.save_pretrained(src)
    return model, opt


def test_converted_posterior_is_the_authors(tmp_path):
    model, opt = _authors_files(tmp_path / "src")
    post = convert_authors_gpt2(tmp_path / "src", tmp_path / "dst")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "dst")
    for n, p in model.named_parameters():
        assert torch.equal(dict(loaded.named_parameters())[n], p), n
    again = Posterior.from_pretrained(tmp_path / "dst", model=loaded)
    assert again.method == "ivon" and again.step is None and again.names == post.names
    # sigma = 1 / sqrt(ess (h + delta)) from the flat vectors, cut in named_parameters() order
    for g in opt.param_groups:
        off = 0
        for p in g["params"]:
            n = next(name for name, q in model.named_parameters() if q is p)
            h = g["hess"][off:off + p.numel()].view_as(p)
            assert torch.equal(again.hess[n], h)
            assert torch.equal(again.momentum[n], g["momentum"][off:off + p.numel()].view_as(p))
            assert torch.allclose(again.std[n], 1 / torch.sqrt(g["ess"] * (h + g["weight_decay"])), rtol=1e-6)
            assert again.group_of(n)["weight_decay"] == g["weight_decay"]
            off += p.numel()
    # the nanoGPT layout of the same run (nn.Linear weights [out, in], and the flat vectors with
    # them) converts to the same model and posterior
    nano = tmp_path / "nano"
    nano.mkdir()
    state = torch.load(tmp_path / "src" / "pytorch_model.bin", weights_only=True)
    flat = {n: (p.t() if n.endswith(LINEAR_WEIGHTS) else p) for n, p in state.items()}
    groups = torch.load(tmp_path / "src" / "optimizer_param_groups.pt", weights_only=True)
    for g, part in zip(groups, ([n for n, p in model.named_parameters() if p.dim() >= 2],
                                [n for n, p in model.named_parameters() if p.dim() < 2])):
        for key in ("hess", "momentum"):
            g[key] = torch.cat([(getattr(again, key)[n].t() if n.endswith(LINEAR_WEIGHTS)
                                 else getattr(again, key)[n]).flatten() for n in part])
    torch.save(flat, nano / "pytorch_model.bin")
    torch.save(groups, nano / "optimizer_param_groups.pt")
    nano_post = convert_authors_gpt2(nano, tmp_path / "nano_dst", n_head=2)
    nano_model = GPT2LMHeadModel.from_pretrained(tmp_path / "nano_dst")
    assert nano_model.config.activation_function == "gelu"       # nanoGPT's exact GELU
    for n, p in loaded.named_parameters():
        assert torch.equal(dict(nano_model.named_parameters())[n], p), n
        assert torch.equal(nano_post.std[n], again.std[n]), n


def test_bad_authors_files_fail_clearly(tmp_path):
    _authors_files(tmp_path / "src", config_json=False)
    groups = torch.load(tmp_path / "src" / "optimizer_param_groups.pt", weights_only=True)
    state = tmp_path / "src" / "pytorch_model.bin"

    def variant(name, groups_obj=None, raw=None):
        d = tmp_path / name
        d.mkdir()
        (d / "pytorch_model.bin").write_bytes(state.read_bytes())
        if raw is not None:
            (d / "optimizer_param_groups.pt").write_bytes(raw)
        else:
            torch.save(groups_obj, d / "optimizer_param_groups.pt")
        return d

    short = [dict(g) for g in groups]
    short[1] = {**short[1], "hess": short[1]["hess"][:-1], "momentum": short[1]["momentum"][:-1]}
    short[1].pop("numel")
    with pytest.raises(ValueError, match=r"lengths \[\d+, \d+\].*match no split"):
        convert_authors_gpt2(variant("short", short), tmp_path / "out1", n_head=2)
    with pytest.raises(ValueError, match="numel=.* but its hess has"):
        convert_authors_gpt2(variant("numel", [groups[0], {**short[1], "numel": groups[1]["numel"]}]),
                             tmp_path / "out2", n_head=2)
    with pytest.raises(ValueError, match="momentum has .* elements, its hess .*: expected equal"):
        convert_authors_gpt2(variant("momentum", [groups[0], {**groups[1], "hess": short[1]["hess"]}]),
                             tmp_path / "out6", n_head=2)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))
    with pytest.raises(ValueError, match=r"refused: it is read with torch.load\(weights_only=True\)"):
        convert_authors_gpt2(variant("evil", raw=pickle.dumps([Evil()])), tmp_path / "out3", n_head=2)
    assert not marker.exists()
    with pytest.raises(ValueError, match="n_head=3 is invalid"):
        convert_authors_gpt2(tmp_path / "src", tmp_path / "out4", n_head=3)
    with pytest.raises(FileNotFoundError, match="lacks"):
        convert_authors_gpt2(tmp_path / "short" / "..", tmp_path / "out5")
    assert not any((tmp_path / f"out{i}").exists() for i in range(1, 7))   # nothing half written
    # without config.json, from the command line
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "cli"), "--n-head", "2"]) == 0
    assert Posterior.from_pretrained(tmp_path / "cli").names[0] == "transformer.wte.weight"
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "cli")]) == 1   # dst not empty
